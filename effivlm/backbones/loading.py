"""Loading a backbone from a local folder or a hub id, through transformers' native classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from effivlm.backbones import get_adapter
from effivlm.backbones.base import FamilyAdapter
from effivlm.backbones.processor import load_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    model: PreTrainedModel
    processor: ProcessorMixin
    adapter: FamilyAdapter
    path: str
    #: the metadata of a compressed checkpoint (effivlm.checkpoints), None for a dense model
    compression: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available on this machine")
    return device


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and not path.startswith((".", "/", "~")) and all(parts)


def load_backbone(
    path: str,
    family: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
) -> Backbone:
    """Load model and processor; ``attn_implementation`` defaults to sdpa (flash_attention_2 where installed)."""
    adapter = get_adapter(family)
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; allowed: {', '.join(DTYPES)}")
    if not Path(path).exists() and not looks_like_hub_id(path):
        raise ValueError(f"model path '{path}' does not exist (and is not a hub id like 'org/name')")
    device = resolve_device(device)
    # imported here: effivlm.checkpoints builds on this module
    from effivlm.checkpoints import is_compressed, load_compressed

    compression = None
    if is_compressed(path):  # a checkpoint written by the compress rule
        model, compression = load_compressed(
            path, adapter, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
    else:
        model = adapter.model_class.from_pretrained(
            path,
            revision=revision,
            dtype=DTYPES[dtype],
            device_map=device,
            attn_implementation=attn_implementation,
        )
    model.eval()
    processor = load_processor(
        path, adapter.processor_class, adapter.image_processor_class, revision=revision
    )
    processor.tokenizer.padding_side = "left"
    return Backbone(
        model=model, processor=processor, adapter=adapter, path=str(path), compression=compression
    )


def load_model_spec(model: dict[str, Any], *, dtype: str, device: str, attn_implementation: str) -> Backbone:
    """:func:`load_backbone` of a job's model spec (``effivlm.config.model_spec``: path, family, revision)."""
    return load_backbone(
        model["path"],
        model["family"],
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        revision=model.get("revision"),
    )
