"""Random visual-token dropping: the floor every informed token method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from effivlm.methods.base import Reduction, SegmentContext, VisualTokenMethod, kept_count
from effivlm.methods.registry import register_method


def random_keep(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``k`` tokens drawn uniformly without replacement out of ``n``."""
    return torch.randperm(n, generator=generator)[:k].sort().values


@register_method
@dataclass(frozen=True)
class RandomTokens(VisualTokenMethod):
    """Keep ceil(budget * N) visual tokens of every image segment, chosen uniformly at random.

    The draw depends only on (seed, image, segment), never on the batch, so batch size does not change it.
    """

    seed: int = 0

    name: ClassVar[str] = "random"

    def reduce(self, ctx: SegmentContext) -> Reduction:
        n = ctx.features.shape[0]
        k = kept_count(self.budget, n)
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + ctx.image_index * 1009 + ctx.segment_index
        )
        positions = random_keep(n, k, generator)
        return Reduction(positions=positions, features=ctx.features[positions.to(ctx.features.device)])
