"""The efficiency rule's job: profile one (model, method variant, budget) and write ``efficiency.json``."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from effivlm.backbones.loading import load_model_spec
from effivlm.efficiency.profile import (
    RANDOM_SIZES,
    Settings,
    apply_weights_to_random,
    profile,
    random_backbone,
    settings_record,
    synthetic_prompts,
)
from effivlm.io import log_to_file, write_text_atomic
from effivlm.methods import build_method
from effivlm.pipeline import Pipeline


def run_efficiency(
    out_path: str | Path,
    *,
    model: dict[str, Any],
    method: str,
    method_name: str,
    method_params: dict[str, Any],
    budget: float,
    weights: dict[str, Any] | None,
    settings: dict[str, Any],
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    log_file: str | Path | None = None,
) -> dict[str, Any]:
    """Profile ``method`` (a config variant, running ``method_name``) at ``budget`` on ``model`` and write the
    record to ``out_path`` (atomically, last). ``weights`` is the variant's weights entry, or None."""
    with log_to_file(log_file, "efficiency") as logger:
        started = time.perf_counter()
        options = Settings(**settings)
        built = build_method(method_name, budget, method_params)  # bad input fails before any model is built
        built.check_family(model["family"])
        compression = None
        if options.backbone == "random":
            backbone = random_backbone(
                model["family"],
                RANDOM_SIZES[options.sizes],
                image_size=options.resolved_image_size(model["family"]),
                dtype=dtype,
                device=device,
                attn=attn_implementation,
                seed=seed,
            )
            prompts = synthetic_prompts(backbone, options, seed)
            if weights is not None:
                compression = apply_weights_to_random(backbone, weights, prompts, seed)
        else:
            backbone = load_model_spec(
                model, dtype=dtype, device=device, attn_implementation=attn_implementation
            )
            prompts = synthetic_prompts(backbone, options, seed)
            compression = backbone.compression
        pipe = Pipeline(backbone, built, seed=seed)
        logger.info(
            "efficiency of %s / %s @ %g on a %s backbone: %d warm-up + %d timed rounds",
            model["name"],
            method,
            budget,
            options.backbone,
            options.warmup,
            options.repeats,
        )
        figures = profile(pipe, prompts, options)
        record = {
            "model": model["name"],
            "family": model["family"],
            "method": method,
            "method_name": method_name,
            "method_params": method_params,
            "budget": budget,
            "weights": None if weights is None else weights["name"],
            "settings": settings_record(options, model["family"]),
            "parameters": sum(p.numel() for p in backbone.model.parameters()),
            "compression": compression,
            "device": str(backbone.device),
            "device_name": torch.cuda.get_device_name()
            if backbone.device.type == "cuda"
            else platform.processor(),
            "threads": torch.get_num_threads(),
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "torch": torch.__version__,
            **figures,
        }
        write_text_atomic(Path(out_path), json.dumps(record, indent=2, default=str) + "\n")
        logger.info(
            "TTFT %.1f ms, decode %.2f ms/step, peak memory %.0f MiB, KV %.3f of dense; job took %.1f s",
            figures["ttft_ms"],
            figures["decode_ms"],
            (figures["peak_memory_bytes"] or 0) / 2**20,
            figures["kv_share"],
            time.perf_counter() - started,
        )
    return record
