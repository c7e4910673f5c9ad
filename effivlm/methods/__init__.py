"""Compression methods and their registry. Importing this package registers every built-in method."""

from effivlm.methods import dense as _dense  # noqa: F401  (registers "dense")
from effivlm.methods.base import (
    KVCacheMethod,
    KVContext,
    KVSelection,
    LayerTokenMethod,
    Method,
    Reduction,
    SegmentContext,
    VisualTokenMethod,
    kept_count,
    kv_capacity,
)
from effivlm.methods.kv import h2o as _h2o  # noqa: F401  (registers "h2o")
from effivlm.methods.kv import lookm as _lookm  # noqa: F401  (registers "lookm")
from effivlm.methods.kv import pyramidkv as _pyramidkv  # noqa: F401  (registers "pyramidkv")
from effivlm.methods.kv import random as _random_kv  # noqa: F401  (registers "random_kv")
from effivlm.methods.kv import snapkv as _snapkv  # noqa: F401  (registers "snapkv")
from effivlm.methods.kv import streamingllm as _streamingllm  # noqa: F401  (registers "streamingllm")
from effivlm.methods.kv import vlcache as _vlcache  # noqa: F401  (registers "vlcache")
from effivlm.methods.registry import METHODS, available_methods, build_method, method_params, register_method
from effivlm.methods.tokens import fastv as _fastv  # noqa: F401  (registers "fastv")
from effivlm.methods.tokens import pooling as _pooling  # noqa: F401  (registers "pool")
from effivlm.methods.tokens import prumerge as _prumerge  # noqa: F401  (registers "prumerge_plus")
from effivlm.methods.tokens import random as _random  # noqa: F401  (registers "random")
from effivlm.methods.tokens import visionzip as _visionzip  # noqa: F401  (registers "visionzip")

__all__ = [
    "METHODS",
    "KVCacheMethod",
    "KVContext",
    "KVSelection",
    "LayerTokenMethod",
    "Method",
    "Reduction",
    "SegmentContext",
    "VisualTokenMethod",
    "available_methods",
    "build_method",
    "kept_count",
    "kv_capacity",
    "method_params",
    "register_method",
]
