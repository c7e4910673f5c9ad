"""Attention scores without eager attention: probes on chosen attention modules, and chunked score math.

Score-based methods need to know how much attention some tokens receive, but a model on sdpa or
flash-attention never materialises attention probabilities. ``probe_attention`` routes only the chosen
attention modules through a thin wrapper registered in transformers' ``AttentionInterface``: the wrapper hands
the module's post-rope queries and keys to a callback, then calls the implementation the model was loaded
with, unchanged. The routing is a per-module copy of the config, restored when the context ends; no other
module, no global setting and nothing at import time is touched. The callback computes just the rows it needs,
in query chunks, with ``received_attention``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PROBE_IMPLEMENTATION = "effivlm_probe"

#: callback(module, query (B, H, q, d), key (B, KVH, k, d), attention_mask, kwargs)
ProbeCallback = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any, dict[str, Any]], None]

_ACTIVE: dict[int, tuple[ProbeCallback, str | None]] = {}


def _base_function(module: nn.Module, implementation: str | None) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        # every transformers modeling file defines its own eager attention next to the module
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"no eager attention function next to {type(module).__name__}")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _probed_attention(module, query, key, value, attention_mask, **kwargs):
    callback, implementation = _ACTIVE[id(module)]
    callback(module, query, key, attention_mask, kwargs)
    return _base_function(module, implementation)(module, query, key, value, attention_mask, **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probed_attention)  # idempotent


@contextmanager
def probe_attention(modules: Sequence[nn.Module], callback: ProbeCallback) -> Iterator[None]:
    """While active, every call of each module's attention function first passes its queries and keys to
    ``callback``; the attention output is the model's own implementation's, bit for bit."""
    _register_probe()
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module in modules:
            if id(module) in _ACTIVE:
                raise RuntimeError(f"{type(module).__name__} is already probed")
            config = module.config
            implementation = config._attn_implementation
            routed = copy.copy(config)  # shallow: only this module sees the probe implementation
            routed._attn_implementation_internal = PROBE_IMPLEMENTATION
            saved.append((module, config))
            _ACTIVE[id(module)] = (callback, implementation)
            module.config = routed
        yield
    finally:
        for module, config in saved:
            module.config = config
            _ACTIVE.pop(id(module), None)


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float | None = None,
    causal: bool = False,
    key_valid: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk: int = 256,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention probabilities, float32, one chunk of query rows at a time.

    ``query`` (B, H, q, d) and ``key`` (B, KVH, k, d) with H a multiple of KVH (grouped-query attention: query
    head j reads key head j // (H / KVH)). As in eager attention, the logits are computed in the inputs' dtype
    and the softmax in float32. ``causal``: query i (of the last q of k positions) sees keys up to k - q + i.
    ``key_valid`` (B, k) bool masks padding keys. ``rows``: query indices to compute (default all). Yields
    (row indices (c,), probs (B, H, c, w)); a padding query, which sees no valid key, gets all-zero probabilities.
    Without ``causal`` w = k; with it, w is one past the last key the chunk's rows can see, so a chunk computes
    only the keys left of the diagonal (about half the work over all rows) and the keys from w on have
    probability zero.
    """
    b, h, q, d = query.shape
    kvh, k = key.shape[1], key.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} key heads")
    group = h // kvh
    scale = d**-0.5 if scaling is None else scaling
    # (B, KVH, 1, d, k): each key head shared by its group of query heads, without a copy
    keys_t = key.transpose(-1, -2)[:, :, None]
    every_row = rows is None
    rows = torch.arange(q, device=query.device) if rows is None else rows.to(query.device)
    masked = causal or key_valid is not None
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]  # (c,)
        # a view when every row is scored, a gather otherwise
        picked = query[:, :, start : start + chunk] if every_row else query[:, :, idx]
        grouped = picked.reshape(b, kvh, group, idx.numel(), d)
        width = min(k, int(idx.max()) + (k - q) + 1) if causal else k
        # (B, H, c, w): a fresh tensor, so the softmax below can run in place
        probs = torch.matmul(grouped, keys_t[..., :width]).reshape(b, h, idx.numel(), width).float()
        probs.mul_(scale)
        if masked:
            allowed = visible_keys(idx, q, k, width, causal, key_valid)
            probs.masked_fill_(~allowed, float("-inf"))
        # softmax in place (a chunk of logits is the largest tensor here): subtract the row max, exp, normalise
        row_max = probs.amax(dim=-1, keepdim=True)
        if masked:
            row_max.masked_fill_(row_max == float("-inf"), 0.0)  # a fully masked row stays all -inf -> 0
        probs.sub_(row_max).exp_()
        probs.div_(probs.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(probs.dtype).tiny))
        yield idx, probs


def visible_keys(
    rows: torch.Tensor, q: int, k: int, width: int, causal: bool, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """Which of the first ``width`` keys each query row of ``rows`` may attend to: (B or 1, 1, c, width) bool."""
    allowed = torch.ones(1, 1, rows.numel(), width, dtype=torch.bool, device=rows.device)
    if causal:
        last_key = rows + (k - q)  # (c,)
        allowed = allowed & (torch.arange(width, device=rows.device)[None, :] <= last_key[:, None])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :width].bool()
    return allowed


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    queries: str = "all",
    scaling: float | None = None,
    causal: bool = False,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over the chosen queries: (B, k) float32.

    ``queries``: ``all`` (the mean over every valid query), ``last`` (the last query only) or ``first`` (the
    first query only, the class token of a ViT). ``query_valid`` (B, q) bool excludes padding queries from the
    mean of ``all``.
    """
    b, h, q, _ = query.shape
    if queries == "last":
        rows = torch.tensor([q - 1])
    elif queries == "first":
        rows = torch.tensor([0])
    elif queries == "all":
        rows = None
    else:
        raise ValueError(f"queries must be 'all', 'last' or 'first', got {queries!r}")
    total = torch.zeros(b, key.shape[2], dtype=torch.float32, device=query.device)
    weight = torch.ones(b, q, dtype=torch.float32, device=query.device)
    if query_valid is not None and queries == "all":
        weight = query_valid.float()
    count = torch.zeros(b, dtype=torch.float32, device=query.device)
    for idx, probs in attention_probabilities(
        query, key, scaling=scaling, causal=causal, key_valid=key_valid, rows=rows, chunk=chunk
    ):
        w = weight[:, idx.to(weight.device)]  # (B, c)
        # weighted sum over heads and rows
        total[:, : probs.shape[-1]] += torch.matmul(w[:, None, None, :], probs).sum(dim=(1, 2))
        count += w.sum(-1) * h
    return total / count.clamp_min(1.0)[:, None]


def head_mean_keys(key: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads, (B, KVH, k, d) -> (B, k, d) float32: the similarity metric of token merging."""
    return key.float().mean(dim=1)


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    scaling: float | None = None,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    sparsity_threshold: float | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention each key receives from the weighted query rows, per query head: ((B, H, k) float32, sparsity).

    ``row_weight`` (B, q): each query row's weight in each sample (0 leaves it out); only rows weighted in some
    sample are computed, a chunk at a time. With ``sparsity_threshold`` t, ``sparsity`` (B,) is the share of the
    weighted rows' visible entries whose probability is below t times their row's maximum, averaged over heads
    (VL-Cache's measure); otherwise None.
    """
    b, h, q, _ = query.shape
    k = key.shape[2]
    chosen = row_weight.ne(0)  # (B, q)
    rows = chosen.any(dim=0).nonzero().squeeze(-1)
    if sparsity_threshold is None and causal and q == k and rows.numel() > chunk and _flash_available(query):
        return _column_sums_by_logsumexp(query, key, row_weight, scaling, key_valid), None
    sums = torch.zeros(b, h, k, dtype=torch.float32, device=query.device)
    below = torch.zeros(b, h, dtype=torch.float32, device=query.device)
    visible = torch.zeros(b, dtype=torch.float32, device=query.device)
    weight = row_weight.float()
    for idx, probs in attention_probabilities(
        query, key, scaling=scaling, causal=causal, key_valid=key_valid, rows=rows, chunk=chunk
    ):
        width = probs.shape[-1]
        w = weight[:, idx]  # (B, c)
        sums[..., :width] += torch.matmul(w[:, None, None, :], probs).squeeze(-2)
        if sparsity_threshold is not None:
            allowed = visible_keys(idx, q, k, width, causal, key_valid) & chosen[:, idx][:, None, :, None]
            cut = probs.amax(dim=-1, keepdim=True) * sparsity_threshold
            below += ((probs < cut) & allowed).sum(dim=(-2, -1)).float()
            visible += allowed[:, 0].sum(dim=(-2, -1)).float()
    if sparsity_threshold is None:
        return sums, None
    return sums, (below / visible.clamp_min(1.0)[:, None]).mean(dim=-1)


def _flash_available(query: torch.Tensor) -> bool:
    """Whether this build has the CPU flash-attention kernel that returns the log-sum-exp of each row."""
    return query.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def _column_sums_by_logsumexp(
    query: torch.Tensor,
    key: torch.Tensor,
    row_weight: torch.Tensor,
    scaling: float | None,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """``attention_column_sums`` over many causal rows with two blocked flash-attention passes, no L x L tensor.

    With s_ij the scaled logits and lse_i the log-sum-exp of row i, the column sum is
    sum_i w_i exp(s_ij - lse_i) = exp(logsumexp_i(s_ij + log w_i - lse_i)): the log-sum-exp of a transposed
    attention in which key j is the query and the rows i are the keys, each with the bias log w_i - lse_i.
    The first pass gives lse_i; the second appends the bias to the keys as one more dimension (the queries get
    a 1 there) and reverses both sequences, so "rows i >= j" becomes an ordinary causal mask. Each sample runs
    on its own valid span, so left padding needs no mask.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, h, q, d = query.shape
    kvh = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    sums = torch.zeros(b, h, q, dtype=torch.float32, device=query.device)
    for s in range(b):
        start = 0 if key_valid is None else int((~key_valid[s].bool()).sum())
        qs = query[s : s + 1, :, start:]
        ks = key[s : s + 1, :, start:].repeat_interleave(h // kvh, dim=1)  # (1, H, n, d)
        n = qs.shape[2]
        _, lse = flash(qs, ks, torch.zeros_like(ks), 0.0, True, scale=scale)  # lse (1, H, n) float32
        w = row_weight[s, start:].float().to(query.device)
        bias = torch.where(w > 0, torch.log(w.clamp_min(1e-30))[None, None] - lse, -1e9)  # (1, H, n)
        # the second pass in float32: the bias (a log-sum-exp) would lose its digits in a 16-bit dtype
        ones = torch.ones(1, h, n, 1, dtype=torch.float32, device=query.device)
        as_queries = torch.cat([ks.float(), ones], dim=-1).flip(2)
        as_keys = torch.cat([qs.float() * scale, bias[..., None]], dim=-1).flip(2)
        _, lse_t = flash(as_queries, as_keys, torch.zeros_like(as_keys), 0.0, True, scale=1.0)
        sums[s, :, start:] = lse_t.flip(-1).exp()
    return sums
