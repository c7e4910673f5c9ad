"""VL-Cache (Tu et al., 2024): modality-aware KV compression. Scores come from the queries after the last image
token (the post-vision prompt); each layer's budget follows its attention density over those queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.kv.select import allocate_budgets, shared_across_heads, top_with_window
from effivlm.methods.registry import register_method

#: no layer keeps less than this share of the prompt besides the window (the reference's 0.01 * 0.9)
MIN_LAYER_SHARE = 0.009


@register_method
@dataclass(frozen=True)
class VLCache(KVCacheMethod):
    """``layer_adaptive``: layer l's non-window budget is proportional to its density 1 - sparsity_l (sparsity:
    the share of post-vision attention entries below 1% of their row's maximum), within [0.9%, 100%] of the
    prompt and with the total kept at the budget (the reference clamps without renormalising, which keeps more
    than the budget at 1%). ``head_adaptive`` as in H2O. The window is the same in every layer."""

    head_adaptive: bool = True
    layer_adaptive: bool = True

    name: ClassVar[str] = "vlcache"
    query_rows: ClassVar[str] = "post_vision"
    #: an attention entry below this share of its row's maximum counts as sparse
    sparsity_threshold: ClassVar[float | None] = 0.01

    def layer_capacities(self, length: int, n_layers: int, sparsity: list[float] | None) -> list[int]:
        capacity = self.capacity(length)
        window = self.window_size(capacity)
        heavy = capacity - window
        if not self.layer_adaptive or sparsity is None or heavy == 0:
            return [capacity] * n_layers
        low = min(heavy, int(MIN_LAYER_SHARE * length))
        density = [1.0 - s for s in sparsity]
        return [h + window for h in allocate_budgets(density, heavy * n_layers, low, length - window)]

    def select(self, ctx: KVContext) -> KVSelection:
        assert ctx.scores is not None
        scores = ctx.scores if self.head_adaptive else shared_across_heads(ctx.scores)
        return KVSelection(top_with_window(scores, ctx.capacity, ctx.window))
