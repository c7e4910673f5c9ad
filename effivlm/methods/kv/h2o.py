"""H2O (Zhang et al., 2023): keep the heavy hitters, the entries that received the most attention over the
whole prompt, and the recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.kv.select import shared_across_heads, top_with_window
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class H2O(KVCacheMethod):
    """Scores: attention received, summed over every prompt query (causal). ``head_adaptive``: each KV head
    ranks by its own group of query heads' attention; otherwise one ranking, summed over heads, for all."""

    head_adaptive: bool = True

    name: ClassVar[str] = "h2o"
    query_rows: ClassVar[str] = "all"

    def select(self, ctx: KVContext) -> KVSelection:
        assert ctx.scores is not None
        scores = ctx.scores if self.head_adaptive else shared_across_heads(ctx.scores)
        return KVSelection(top_with_window(scores, ctx.capacity, ctx.window))
