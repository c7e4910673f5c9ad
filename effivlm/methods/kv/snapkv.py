"""SnapKV (Li et al., 2024): rank the prompt's entries by the attention of an observation window of the last
queries, smoothed by pooling along the sequence, and keep the top ones plus the window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.kv.select import POOLINGS, pool_scores, shared_across_heads, top_with_window
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class SnapKV(KVCacheMethod):
    """The observation window is the recent window (its queries score, its entries are kept). ``pooling``
    (``avg`` or ``max``) with an odd ``kernel`` smooths the scores of the entries before the window, so that
    neighbours of important entries are kept too. ``head_adaptive`` as in H2O."""

    head_adaptive: bool = True
    pooling: str = "avg"
    kernel: int = 5

    name: ClassVar[str] = "snapkv"
    query_rows: ClassVar[str] = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"method '{self.name}': unknown pooling kind {self.pooling!r}; allowed: {', '.join(POOLINGS)}"
            )
        if (
            isinstance(self.kernel, bool)
            or not isinstance(self.kernel, int)
            or self.kernel < 1
            or not self.kernel % 2
        ):
            raise ValueError(f"method '{self.name}': kernel must be an odd integer >= 1, got {self.kernel!r}")

    def ranking(self, ctx: KVContext) -> torch.Tensor:
        """The pooled scores of the entries before the window, the window's own scores after them."""
        assert ctx.scores is not None
        scores = ctx.scores if self.head_adaptive else shared_across_heads(ctx.scores)
        cut = scores.shape[-1] - ctx.window
        return torch.cat([pool_scores(scores[:, :cut], self.pooling, self.kernel), scores[:, cut:]], dim=-1)

    def select(self, ctx: KVContext) -> KVSelection:
        return KVSelection(top_with_window(self.ranking(ctx), ctx.capacity, ctx.window))
