"""Sizes of the small backbones the embedded default trains. No torch or transformers: config validation reads
a model's depth from here without importing them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a small backbone for the embedded default."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    max_positions: int = 1024
