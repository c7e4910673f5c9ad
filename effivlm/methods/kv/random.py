"""Random KV eviction: the floor every informed KV-cache method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.kv.select import top_with_window
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class RandomKV(KVCacheMethod):
    """Each layer and KV head keeps the recent window and capacity - window entries drawn uniformly from the
    rest. The draw depends only on (seed, layer, prompt length), never on the batch."""

    seed: int = 0

    name: ClassVar[str] = "random_kv"

    def select(self, ctx: KVContext) -> KVSelection:
        heads, length = ctx.keys.shape[:2]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_index)
        scores = torch.rand(heads, length, generator=generator).to(ctx.keys.device)
        return KVSelection(top_with_window(scores, ctx.capacity, ctx.window))
