"""Compression methods and their registry. Importing this package registers every built-in method."""

from effivlm.methods import dense as _dense  # noqa: F401  (registers "dense")
from effivlm.methods.base import (
    LayerTokenMethod,
    Method,
    Reduction,
    SegmentContext,
    VisualTokenMethod,
    kept_count,
)
from effivlm.methods.registry import METHODS, available_methods, build_method, method_params, register_method
from effivlm.methods.tokens import fastv as _fastv  # noqa: F401  (registers "fastv")
from effivlm.methods.tokens import pooling as _pooling  # noqa: F401  (registers "pool")
from effivlm.methods.tokens import prumerge as _prumerge  # noqa: F401  (registers "prumerge_plus")
from effivlm.methods.tokens import random as _random  # noqa: F401  (registers "random")
from effivlm.methods.tokens import visionzip as _visionzip  # noqa: F401  (registers "visionzip")

__all__ = [
    "METHODS",
    "LayerTokenMethod",
    "Method",
    "Reduction",
    "SegmentContext",
    "VisualTokenMethod",
    "available_methods",
    "build_method",
    "kept_count",
    "method_params",
    "register_method",
]
