"""Row reductions that the scoring and merging code runs over millions of entries, written with vectorised
tensor operations where torch's direct kernels are not vectorised on a CPU. Each equals its direct form
exactly (tests compare them bit for bit); pure functions of tensors.

Measured on this project's 2-core CPU (one thread), per million float32 entries: ``argmax`` over the last
dimension 1.8 ms against 0.1 ms for ``amax``; ``lt`` into a bool tensor and its sum 0.6-0.9 ms against 0.25 ms
for the arithmetic count below. Picking 2,460 of 4,100 rows of 64 in 16 heads: ``gather`` with an expanded
index 4.3 ms, indexing whole rows 1.5 ms.
"""

from __future__ import annotations

import torch

#: a power of two: ``p * BELOW_SCALE`` is exact, and ``limit * BELOW_SCALE - p * BELOW_SCALE`` is at least 1
#: wherever it is positive, for any limit above 2**-76
BELOW_SCALE = 2.0**100
#: the smallest relative threshold ``count_below`` takes: t / n stays above 2**-76 for rows of up to 2**36
#: probabilities (a row's maximum probability is at least 1 / n)
MIN_RELATIVE_THRESHOLD = 1e-9
#: columns per block of ``row_argmax``
ARGMAX_BLOCK = 64


def check_relative_threshold(threshold: float, name: str = "threshold") -> None:
    """Raise ValueError naming ``name`` unless ``threshold`` is in [MIN_RELATIVE_THRESHOLD, 1), the range
    ``count_below`` counts exactly."""
    if not MIN_RELATIVE_THRESHOLD <= threshold < 1:
        raise ValueError(f"{name} must be in [{MIN_RELATIVE_THRESHOLD}, 1), got {threshold}")


def count_below(probs: torch.Tensor, threshold: float, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of probabilities ``probs`` (..., n), how many entries are below ``threshold`` times the row's
    maximum, as float32 counts: ``probs.lt(threshold * probs.amax(-1, keepdim=True)).sum(-1)``. The scaled
    difference of limit and entry, clamped to [0, 1], is 1 where the entry is below and 0 elsewhere; no
    bool tensor. ``threshold`` in [MIN_RELATIVE_THRESHOLD, 1); ``scratch`` (float32, ``probs``' shape, such
    as the consumed logits) receives the differences instead of a new tensor."""
    check_relative_threshold(threshold)
    limit = probs.amax(dim=-1, keepdim=True).mul_(threshold).mul_(BELOW_SCALE)
    usable = scratch is not None and scratch.dtype == torch.float32 and scratch.shape == probs.shape
    below = torch.sub(limit, probs, alpha=BELOW_SCALE, out=scratch if usable else None)
    return below.clamp_(0.0, 1.0).sum(dim=-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each head: ``x`` (H, L, d), ``index`` (H, k) -> (H, k, d) with out[h, j] = x[h, index[h, j]];
    ``x.gather(1, index[..., None].expand(-1, -1, d))``, with each row copied whole."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index.to(x.device)]


def row_argmax(x: torch.Tensor, block: int = ARGMAX_BLOCK) -> torch.Tensor:
    """``x.argmax(-1)``: the first index of each row's maximum (rows without NaN). The maxima of blocks of
    ``block`` columns come from ``amax``; ``argmax`` then runs over those maxima (the first block holding the
    row's maximum) and over that block's entries only."""
    n = x.shape[-1]
    blocks = n // block
    if blocks < 2:
        return x.argmax(dim=-1)
    whole = blocks * block
    peaks = x[..., :whole].unflatten(-1, (blocks, block)).amax(dim=-1)  # (..., blocks)
    if whole < n:
        peaks = torch.cat([peaks, x[..., whole:].amax(dim=-1, keepdim=True)], dim=-1)
    start = peaks.argmax(dim=-1, keepdim=True) * block  # (..., 1)
    # the last block may be short: its missing columns repeat column n - 1, after the real ones
    columns = (start + torch.arange(block, device=x.device)).clamp_max_(n - 1)
    return (start + x.gather(-1, columns).argmax(dim=-1, keepdim=True)).squeeze(-1)
