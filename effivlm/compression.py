"""The jobs of parameter compression: write a calibration set, calibrate a model, compress it into a checkpoint.

Each is one function a workflow script calls; each writes its output atomically and logs what it did.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from effivlm.backbones.loading import load_model_spec
from effivlm.calibration import Statistics, calibration_batches, collect_statistics
from effivlm.checkpoints import save_compressed
from effivlm.data import calibration as calibration_data
from effivlm.io import file_sha256, log_to_file
from effivlm.methods.weights import build_weight_method

log = logging.getLogger(__name__)


def write_calibration_set(
    out_path: str | Path,
    *,
    samples: int,
    synthetic_dir: str | Path | None = None,
    tasks: list[str] | None = None,
    path: str | Path | None = None,
    image_root: str | Path | None = None,
    log_file: str | Path | None = None,
) -> str:
    """The calibration set as effivlm JSONL: from the synthetic suite, or converted from a local file.
    Returns its digest."""
    with log_to_file(log_file, "calibration set") as logger:
        if path is not None:
            records = calibration_data.file_records(
                Path(path), samples, None if image_root is None else Path(image_root)
            )
        else:
            if synthetic_dir is None or not tasks:
                raise ValueError("an embedded calibration set needs the synthetic suite's folder and tasks")
            records = calibration_data.embedded_records(Path(synthetic_dir), list(tasks), samples)
        digest = calibration_data.write_calibration(Path(out_path), records)
        logger.info("calibration set: %d records -> %s (sha256 %s)", len(records), out_path, digest[:12])
    return digest


def run_calibration(
    model: dict[str, Any],
    calibration_file: str | Path,
    out_path: str | Path,
    *,
    hessians: bool,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    log_file: str | Path | None = None,
) -> Statistics:
    """Calibration statistics of one model over one calibration set, saved as safetensors."""
    with log_to_file(log_file, "calibration") as logger:
        started = time.perf_counter()
        records = calibration_data.read_calibration(Path(calibration_file))
        backbone = load_model_spec(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        meta = {
            "model": model["name"],
            "calibration_sha256": file_sha256(calibration_file),
            "samples": len(records),
        }
        stats = collect_statistics(backbone, records, batch_size=batch_size, hessians=hessians, meta=meta)
        stats.save(Path(out_path))
        logger.info(
            "calibrated %s on %d samples (%d tokens, hessians %s) in %.1f s",
            model["name"],
            len(records),
            stats.tokens,
            hessians,
            time.perf_counter() - started,
        )
    return stats


def run_compression(
    model: dict[str, Any],
    weights: dict[str, Any],
    out_dir: str | Path,
    *,
    statistics: str | Path | None,
    calibration_file: str | Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    log_file: str | Path | None = None,
) -> dict[str, Any]:
    """Compress one model with one weight method (``weights``: ``{"name", "method", "params"}``) and save the
    checkpoint to ``out_dir``; returns its metadata."""
    with log_to_file(log_file, "compression") as logger:
        started = time.perf_counter()
        method = build_weight_method(
            weights["method"], weights.get("params")
        )  # bad input fails before loading
        backbone = load_model_spec(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        dense_parameters = sum(int(p.numel()) for p in backbone.model.parameters())
        stats = (
            Statistics.load(Path(statistics), method.needs)
            if statistics is not None
            else Statistics({}, {}, {}, 0)
        )
        batches = None
        if method.needs_batches:
            if calibration_file is None:
                raise ValueError(f"weight method '{method.name}' needs the calibration set")
            records = calibration_data.read_calibration(Path(calibration_file))
            batches = list(calibration_batches(backbone, records, batch_size))
        torch.manual_seed(seed)
        report = method.compress(backbone, stats, batches)
        calibration = dict(stats.meta)
        metadata = save_compressed(
            backbone,
            method,
            report,
            Path(out_dir),
            calibration=calibration,
            dense_parameters=dense_parameters,
            extra={
                "weights": weights["name"],
                "model": model["name"],
                "seconds": time.perf_counter() - started,
            },
        )
        logger.info(
            "%s / %s: %s, %d bytes on disk, in %.1f s",
            model["name"],
            weights["name"],
            report.summary,
            metadata["size_bytes"],
            time.perf_counter() - started,
        )
    return metadata
