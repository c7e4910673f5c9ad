"""Backbones: one adapter per model family, loading, and the small backbones of the embedded default.

Family names are known without importing transformers (config validation stays fast); an adapter's module
is imported the first time the family is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from effivlm.registry import UnknownNameError, closest_hint

if TYPE_CHECKING:
    from effivlm.backbones.base import FamilyAdapter

#: family name -> module holding its adapter
FAMILY_MODULES = {
    "internvl": "effivlm.backbones.internvl",
    "llava_onevision": "effivlm.backbones.llava_onevision",
    "qwen2_5_vl": "effivlm.backbones.qwen2_vl",
    "qwen2_vl": "effivlm.backbones.qwen2_vl",
}


def available_families() -> list[str]:
    return sorted(FAMILY_MODULES)


def get_adapter(family: str) -> FamilyAdapter:
    if family not in FAMILY_MODULES:
        known = available_families()
        raise UnknownNameError(
            f"unknown family '{family}'{closest_hint(family, known)}; known: {', '.join(known)}"
        )
    importlib.import_module(FAMILY_MODULES[family])
    from effivlm.backbones.base import ADAPTERS

    return ADAPTERS.get(family)()


def __getattr__(name: str) -> Any:
    if name in ("FamilyAdapter", "Segment", "TinySizes", "ADAPTERS"):
        return getattr(importlib.import_module("effivlm.backbones.base"), name)
    raise AttributeError(f"module 'effivlm.backbones' has no attribute '{name}'")


__all__ = ["FAMILY_MODULES", "FamilyAdapter", "available_families", "get_adapter"]
