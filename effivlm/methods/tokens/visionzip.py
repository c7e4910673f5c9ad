"""VisionZip (Yang et al., 2024): dominant tokens by vision attention plus contextual tokens merged by key similarity.

Per image segment (crop or tile) of N tokens, k = ceil(budget * N) are kept, split as the paper splits its
budgets (54 + 10 of 64, 162 + 30 of 192): ``contextual = floor(k / 6.4)`` and ``dominant = k - contextual``.
Dominant tokens are those receiving the most attention in the vision encoder's feature layer (the class token's
row where the tower has one, else the mean over all queries). Of the rest, ``contextual`` targets are taken at
a uniform stride; every other remaining token joins the target with the most similar key (cosine, keys averaged
over heads), and each contextual token is the mean of its target and the tokens that joined it.

For the Qwen-VL families the tokens are those after the 2x2 patch merger, with a token's attention the sum
and its key the mean over its four patches. Merging averages the projected tokens (the paper averages the
encoder outputs before the projector; for Qwen's merger the two coincide, for an MLP projector they differ).
A merged token takes its target's sequence slot, so positions stay those of the original prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from effivlm.methods.base import Reduction, SegmentContext, VisualTokenMethod, kept_count
from effivlm.methods.registry import register_method

#: the paper's dominant : contextual split, 5.4 : 1
CONTEXTUAL_SHARE = 1 / 6.4


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) counts of a budget of ``k`` tokens."""
    contextual = int(k * CONTEXTUAL_SHARE + 1e-9)
    return k - contextual, contextual


def visionzip(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``features`` (N, D) to ``k`` tokens. Returns (positions (k,) sorted, features (k, D))."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n), features
    dominant_n, contextual_n = split_budget(k)
    device = features.device
    dominant = torch.topk(attention, dominant_n).indices.to(device)
    rest = torch.ones(n, dtype=torch.bool, device=device)
    rest[dominant] = False
    remaining = rest.nonzero().squeeze(-1)  # ascending
    positions, kept = [dominant], [features[dominant]]
    if contextual_n:
        step = max(1, remaining.numel() // contextual_n)
        is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=device)
        is_target[torch.arange(0, remaining.numel(), step, device=device)[:contextual_n]] = True
        targets, others = remaining[is_target], remaining[~is_target]
        metric = F.normalize(keys.to(device).float(), dim=-1)
        assign = (metric[others] @ metric[targets].T).argmax(-1)  # (others,) -> target number
        summed = features[targets].float().index_add(0, assign, features[others].float())
        counts = torch.ones(targets.numel(), device=device).index_add(
            0, assign, torch.ones(others.numel(), device=device)
        )
        positions.append(targets)
        kept.append((summed / counts[:, None]).to(features.dtype))
    positions_all = torch.cat(positions)
    order = positions_all.argsort()
    return positions_all[order].cpu(), torch.cat(kept)[order]


@register_method
@dataclass(frozen=True)
class VisionZip(VisualTokenMethod):
    """Dominant plus contextual visual tokens per image segment, from the vision encoder's attention."""

    name: ClassVar[str] = "visionzip"
    needs_vision_attention: ClassVar[bool] = True

    def reduce(self, ctx: SegmentContext) -> Reduction:
        k = kept_count(self.budget, ctx.features.shape[0])
        positions, features = visionzip(ctx.features, ctx.attention, ctx.keys, k)
        return Reduction(positions=positions, features=features)
