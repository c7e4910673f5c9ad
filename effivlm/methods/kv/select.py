"""Tensor math shared by the KV-cache methods: top-k with a recent window, head sharing, pooling, per-layer
budgets and LOOK-M's merging. Pure functions of tensors and integers; no model, no cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effivlm.ops import gather_rows, row_argmax

POOLINGS = ("avg", "max")
MERGES = ("none", "average", "pivotal")


def top_with_window(scores: torch.Tensor, capacity: int, window: int) -> torch.Tensor:
    """Indices kept of L entries, (KVH, capacity) sorted per head: the last ``window`` entries, and the
    ``capacity - window`` highest-scoring of the others. ``scores`` (KVH, L)."""
    heads, length = scores.shape
    device = scores.device
    if capacity >= length:
        return torch.arange(length, device=device).expand(heads, -1)
    window = min(window, capacity)
    recent = torch.arange(length - window, length, device=device).expand(heads, -1)
    heavy = capacity - window
    if heavy == 0:
        return recent
    top = torch.topk(scores[:, : length - window], heavy, dim=-1).indices
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


def shared_across_heads(scores: torch.Tensor) -> torch.Tensor:
    """One ranking for every KV head: the scores summed over heads, (KVH, L) -> (KVH, L) (a broadcast view)."""
    return scores.sum(dim=0, keepdim=True).expand_as(scores)


def pool_scores(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """SnapKV's smoothing: each entry's score pooled with its neighbours along the sequence, (KVH, L) -> (KVH, L);
    ``kernel`` is odd, the ends are zero-padded (average) or ignored (max)."""
    if kernel == 1:
        return scores
    if kind == "avg":
        return F.avg_pool1d(scores[None], kernel, stride=1, padding=kernel // 2)[0]
    if kind == "max":
        return F.max_pool1d(scores[None], kernel, stride=1, padding=kernel // 2)[0]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")


def pyramid_capacities(heavy: int, window: int, length: int, n_layers: int, beta: float) -> list[int]:
    """PyramidKV: the ``heavy`` non-window entries per layer spread linearly from 2 * heavy - m in the first
    layer down to m = heavy / beta in the last (at most L - window in any layer); each layer adds the window."""
    if n_layers == 1:
        return [heavy + window]
    low = int(heavy // beta)
    high = 2 * heavy - low
    if high > length - window:
        high = length - window
        low = 2 * heavy - high
    steps = (high - low) // (n_layers - 1)
    return [max(1, high - layer * steps + window) for layer in range(n_layers)]


def allocate_budgets(weights: list[float], total: int, low: int, high: int) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total``, each within [low, high] (water-filling: a
    clamped layer's excess or deficit is spread over the others in proportion to their weights)."""
    n = len(weights)
    if not low * n <= total <= high * n:
        raise ValueError(f"cannot split {total} over {n} layers within [{low}, {high}]")
    w = torch.tensor(weights, dtype=torch.float64).clamp_min(1e-12)
    share = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    remaining = float(total)
    while True:
        share[free] = w[free] / w[free].sum() * remaining
        over = free & (share > high)
        under = free & (share < low)
        if not bool(over.any() or under.any()):
            break
        share[over] = high
        share[under] = low
        free &= ~(over | under)
        remaining = total - float(share[~free].sum())
        if not bool(free.any()):
            break
    base = share.floor().long()
    left = total - int(base.sum())
    order = torch.argsort(share - base.double(), descending=True, stable=True)
    for i in order.tolist():
        if left <= 0:
            break
        if base[i] < high:
            base[i] += 1
            left -= 1
    return base.tolist()


def text_prior(scores: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """LOOK-M's ranking: every text entry above every image entry, each group ordered by its scores."""
    lift = scores.max() - scores.min() + 1.0
    return scores + (~is_image).to(scores.dtype)[None] * lift


def most_similar(queries: torch.Tensor, candidates: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per head, the index of the candidate most cosine-similar to each query: (H, n, d), (H, m, d) -> (H, n).
    The (n, m) similarities are computed a chunk of queries at a time, so they stay small, into one buffer.
    Only the candidates are normalised: a query's length scales its row and leaves the row's argmax."""
    unit = F.normalize(candidates, dim=-1).transpose(1, 2).contiguous()  # (H, d, m)
    heads, n = queries.shape[:2]
    out = torch.empty(heads, n, dtype=torch.long, device=queries.device)
    buffer = torch.empty(heads, min(chunk, n), unit.shape[-1], dtype=unit.dtype, device=unit.device)
    for start in range(0, n, chunk):
        sims = buffer[:, : min(chunk, n - start)]
        torch.matmul(queries[:, start : start + chunk], unit, out=sims)
        out[:, start : start + chunk] = row_argmax(sims)
    return out


def merge_evicted(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOOK-M: every evicted entry joins the kept entry whose key is most cosine-similar (per head), and each
    kept entry becomes the mean of itself and what joined it. ``average`` joins the evicted entry itself;
    ``pivotal`` joins its midpoint with the kept entry (the kept "pivot" weighs more). ``keys``/``values``
    (KVH, L, d), ``kept`` (KVH, k) indices; returns the kept entries' new keys and values (KVH, k, d).

    In closed form, with n evicted entries of sum S joining kept entry x: ``average`` gives (x + S) / (1 + n),
    ``pivotal`` (x + (S + n x) / 2) / (1 + n) = ((2 + n) x + S) / (2 + 2n); so only S and n are accumulated
    (float32), never a tensor per evicted entry and pivot."""
    if how not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {how!r}")
    heads, length, dim = keys.shape
    kept_keys, kept_values = gather_rows(keys, kept), gather_rows(values, kept)
    if how == "none" or kept.shape[1] == length:
        return kept_keys, kept_values
    evicted_mask = torch.ones(heads, length, dtype=torch.bool, device=keys.device)
    evicted_mask.scatter_(1, kept, False)
    evicted = evicted_mask.nonzero()[:, 1].view(heads, -1)  # (KVH, e): same count in every head
    gone_keys = gather_rows(keys, evicted)
    target = most_similar(gone_keys.float(), kept_keys.float())  # (KVH, e): the kept entry each one joins
    joined = torch.zeros(heads, kept.shape[1], dtype=torch.float32, device=keys.device)
    joined.scatter_add_(1, target, torch.ones(target.shape, dtype=torch.float32, device=keys.device))
    if how == "average":
        own, denominator = torch.ones_like(joined), joined + 1.0
    else:
        own, denominator = joined + 2.0, joined.mul(2.0).add_(2.0)
    spots = target[..., None].expand(-1, -1, dim)

    def merged(kept_t: torch.Tensor, gone_t: torch.Tensor) -> torch.Tensor:
        total = kept_t.float().mul(own[..., None]).scatter_add_(1, spots, gone_t.float())
        return total.div_(denominator[..., None]).to(keys.dtype)

    return merged(kept_keys, gone_keys), merged(kept_values, gather_rows(values, evicted))
