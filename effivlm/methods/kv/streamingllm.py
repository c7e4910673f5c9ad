"""StreamingLLM (Xiao et al., 2024): keep the first entries (attention sinks) and the most recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class StreamingLLM(KVCacheMethod):
    """Each layer keeps the prompt's first capacity - window entries and its last window entries."""

    name: ClassVar[str] = "streamingllm"

    def select(self, ctx: KVContext) -> KVSelection:
        heads, length = ctx.keys.shape[:2]
        device = ctx.keys.device
        if ctx.capacity >= length:
            return KVSelection(torch.arange(length, device=device).expand(heads, -1))
        sinks = torch.arange(ctx.capacity - ctx.window, device=device)
        recent = torch.arange(length - ctx.window, length, device=device)
        return KVSelection(torch.cat([sinks, recent]).expand(heads, -1))
