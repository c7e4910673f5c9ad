"""PruMerge+ (Shang et al., 2024): attention outliers plus spatially uniform samples, merged with their neighbours.

Per image segment of N tokens, with a = the attention each token received in the vision encoder's feature layer
(the class token's row where the tower has one, else the mean over all queries), normalised to sum to 1:
1. selection: the IQR outliers of a (a > Q3 + 1.5 IQR), at most k = ceil(budget * N) of them (the highest),
   padded to exactly k by tokens sampled at a uniform stride over the remaining ones in row-major (spatial) order;
2. merging: each kept token i becomes x_i + sum_j a_j x_j over its ``neighbours`` (32) most key-similar other
   tokens of the segment (cosine, keys averaged over heads), as the reference code updates its cluster centres.
At budget 1.0 nothing is pruned and nothing merged. Merging acts on the projected tokens (see VisionZip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from effivlm.methods.base import Reduction, SegmentContext, VisualTokenMethod, kept_count
from effivlm.methods.registry import register_method


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` (N,) above Q3 + 1.5 IQR, highest score first."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    idx = (scores > q3 + 1.5 * (q3 - q1)).nonzero().squeeze(-1)
    return idx[scores[idx].argsort(descending=True)]


def uniform_pick(candidates: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` of the sorted ``candidates`` at a uniform stride: element floor(i * len / m) for i < m."""
    if m <= 0:
        return candidates[:0]
    return candidates[torch.arange(m, device=candidates.device) * candidates.numel() // m]


def prumerge_select(attention: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` tokens PruMerge+ keeps: outliers first, then uniform samples."""
    n = attention.shape[0]
    chosen = iqr_outliers(attention)[:k]
    free = torch.ones(n, dtype=torch.bool, device=attention.device)
    free[chosen] = False
    padding = uniform_pick(free.nonzero().squeeze(-1), k - chosen.numel())
    return torch.cat([chosen, padding]).sort().values


def prumerge_merge(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """Features (k, D) of the ``kept`` tokens after each absorbs its most key-similar other tokens, weighted by
    their share of the segment's attention."""
    n = features.shape[0]
    weight = attention.float() / attention.float().sum().clamp_min(1e-12)  # (N,)
    metric = F.normalize(keys.float(), dim=-1)
    sim = metric[kept] @ metric.T  # (k, N)
    sim[torch.arange(kept.numel()), kept] = float("-inf")  # a token is not its own neighbour
    m = min(neighbours, n - 1)
    nearest = torch.topk(sim, m, dim=-1).indices  # (k, m)
    absorbed = (weight[nearest][..., None] * features.float()[nearest]).sum(1)  # (k, D)
    return (features[kept].float() + absorbed).to(features.dtype)


@register_method
@dataclass(frozen=True)
class PruMergePlus(VisualTokenMethod):
    """IQR outliers of vision attention padded by uniform samples, each absorbing its nearest neighbours."""

    neighbours: int = 32

    name: ClassVar[str] = "prumerge_plus"
    needs_vision_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ValueError(
                f"method 'prumerge_plus': neighbours must be an integer >= 1, got {self.neighbours!r}"
            )

    def reduce(self, ctx: SegmentContext) -> Reduction:
        n = ctx.features.shape[0]
        k = kept_count(self.budget, n)
        if k >= n:
            return Reduction(positions=torch.arange(n), features=ctx.features)
        attention = ctx.attention.to(ctx.features.device)
        kept = prumerge_select(attention, k)
        features = prumerge_merge(
            ctx.features, attention, ctx.keys.to(ctx.features.device), kept, self.neighbours
        )
        return Reduction(positions=kept.cpu(), features=features)
