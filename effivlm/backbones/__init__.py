"""Backbones: one adapter per model family, loading, and the small backbones of the embedded default."""

from effivlm.backbones import internvl as _internvl  # noqa: F401  (registers its adapter)
from effivlm.backbones import llava_onevision as _llava_onevision  # noqa: F401
from effivlm.backbones import qwen2_vl as _qwen2_vl  # noqa: F401
from effivlm.backbones.base import ADAPTERS, FamilyAdapter, Segment, TinySizes, available_families, get_adapter

__all__ = ["ADAPTERS", "FamilyAdapter", "Segment", "TinySizes", "available_families", "get_adapter"]
