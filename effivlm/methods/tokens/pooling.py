"""Spatial average pooling of visual tokens: the budget-matched pooling baseline of EffiVLM-Bench.

Each image segment's token grid is average-pooled into ``k = kept_count(budget, N)`` windows with adaptive
pooling semantics (window ``i`` of ``n_out`` over ``n_in`` covers ``floor(i * n_in / n_out)`` up to
``ceil((i + 1) * n_in / n_out)``), so windows are contiguous, nearly equal, and overlap by at most one token when
the sizes do not divide. Every pooled token takes the sequence slot (and so the position ids) of the input token
at its window's centre. A standard token-reduction baseline with no scores and no learned parts; at budget 1.0
every window is one token, so the output is the input and dense predictions are reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from effivlm.methods.base import Reduction, SegmentContext, VisualTokenMethod, kept_count
from effivlm.methods.registry import register_method


def window_centres(n_in: int, n_out: int) -> torch.Tensor:
    """Centre index of each of the ``n_out`` adaptive-pooling windows over ``n_in`` items, (n_out,) long.

    With ``n_out <= n_in`` window starts and ends both strictly increase, so the centres do too.
    """
    i = torch.arange(n_out)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = -torch.div(-(i + 1) * n_in, n_out, rounding_mode="floor")  # ceil((i + 1) * n_in / n_out)
    return torch.div(start + end - 1, 2, rounding_mode="floor")


def output_grid(grid: tuple[int, int], k: int) -> tuple[int, int] | None:
    """The (rows', cols') with rows' * cols' == k inside ``grid`` whose aspect ratio is closest to the grid's.

    An exact aspect ratio is often impossible (k = 6 of a 4 x 4 grid: 2 x 3), so the closest one in log
    space wins, ties going to fewer rows. None when no factorisation of k fits inside the grid (k = 7 of 4 x 4):
    the caller then pools the row-major sequence instead.
    """
    rows, cols = grid
    best: tuple[Fraction, int] | None = None
    for r in range(1, min(rows, k) + 1):
        c, rest = divmod(k, r)
        if rest or c > cols:
            continue
        # |log((r / c) / (rows / cols))|, compared exactly as the ratio max / min of r * cols and rows * c
        a, b = r * cols, rows * c
        key = (Fraction(max(a, b), min(a, b)), r)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    r = best[1]
    return r, k // r


def _check_sorted(positions: torch.Tensor) -> None:
    # the windows' centres increase along each axis, so row-major window order is already sorted position order
    if not bool((positions[1:] > positions[:-1]).all()):
        raise RuntimeError(f"pooled positions are not strictly increasing: {positions.tolist()}")


def pool_sequence(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``features`` (N, D) over ``k`` adaptive windows of the sequence; position = each window's middle.

    Returns (positions (k,) long, sorted; features (k, D)) in the input dtype, averaged in float32.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"pool_sequence: k must be in [1, {n}], got {k}")
    x = features.float().T[None]  # (1, D, N)
    pooled = F.adaptive_avg_pool1d(x, k)[0].T  # (k, D)
    positions = window_centres(n, k)
    _check_sorted(positions)
    return positions, pooled.to(features.dtype)


def pool_grid(
    features: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``features`` (N, D), a row-major (rows, cols) grid, into an (rows', cols') grid of windows.

    Position of each pooled token = the row-major index of the input token at its window's centre. Returns
    (positions (rows' * cols',) long, sorted; features (rows' * cols', D)) in row-major window order.
    """
    rows, cols = grid
    out_rows, out_cols = out_grid
    n, d = features.shape
    if rows * cols != n:
        raise ValueError(f"pool_grid: grid {grid} holds {rows * cols} tokens, features hold {n}")
    if not (1 <= out_rows <= rows and 1 <= out_cols <= cols):
        raise ValueError(f"pool_grid: output grid {out_grid} does not fit inside grid {grid}")
    x = features.float().T.reshape(1, d, rows, cols)  # (1, D, rows, cols)
    pooled = F.adaptive_avg_pool2d(x, (out_rows, out_cols))  # (1, D, rows', cols')
    pooled = pooled[0].flatten(1).T  # (rows' * cols', D), row-major
    centre_rows = window_centres(rows, out_rows)  # (rows',)
    centre_cols = window_centres(cols, out_cols)  # (cols',)
    positions = (centre_rows[:, None] * cols + centre_cols[None, :]).flatten()  # (rows' * cols',)
    _check_sorted(positions)
    return positions, pooled.to(features.dtype)


def pool_tokens(
    features: torch.Tensor, grid: tuple[int, int] | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool a segment's ``features`` (N, D) to exactly ``k`` tokens: over its grid when it has one and a grid of
    k windows fits inside it, else over the row-major sequence."""
    out = output_grid(grid, k) if grid is not None else None
    if out is None:
        return pool_sequence(features, k)
    return pool_grid(features, grid, out)


@register_method
@dataclass(frozen=True)
class SpatialPooling(VisualTokenMethod):
    """Spatial average pooling to ceil(budget * N) tokens per segment: the pooling baseline of EffiVLM-Bench."""

    name: ClassVar[str] = "pool"

    def reduce(self, ctx: SegmentContext) -> Reduction:
        n = ctx.features.shape[0]
        positions, features = pool_tokens(ctx.features, ctx.grid, kept_count(self.budget, n))
        return Reduction(positions=positions, features=features)
