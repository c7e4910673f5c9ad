"""Attention scores without eager attention: probes on chosen attention modules, and chunked score math.

Score-based methods need to know how much attention some tokens receive, but a model on sdpa or
flash-attention never materialises attention probabilities. ``probe_attention`` routes only the chosen
attention modules through a thin wrapper registered in transformers' ``AttentionInterface``: the wrapper hands
the module's post-rope queries and keys to a callback, then calls the implementation the model was loaded
with, unchanged. The routing is a per-module copy of the config, restored when the context ends; no other
module, no global setting and nothing at import time is touched. The callback computes just the rows it needs,
in query chunks, with ``received_attention``; when a score needs every query's row, ``attention_column_sums``
computes the call's output from the same probabilities and the model's own implementation is skipped.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from effivlm.ops import check_relative_threshold, count_below
from effivlm.parallel import Scratch, run_tasks

PROBE_IMPLEMENTATION = "effivlm_probe"

#: callback(module, query (B, H, q, d), key (B, KVH, k, d), value (B, KVH, k, d), attention_mask, kwargs): None,
#: or the attention output (B, q, H, d) when the callback computed it itself (the module's function is skipped)
ProbeCallback = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]], torch.Tensor | None
]

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


@dataclass(frozen=True)
class ProbeTiming:
    """One probed attention call under ``time_probes``: the callback's wall time, the model's own attention
    function's on the same inputs, and whether the callback's output replaced that function's."""

    module: str
    callback_s: float
    base_s: float
    replaced: bool

    @property
    def price_s(self) -> float:
        """What scoring added to the call: the callback, less the call it made unnecessary."""
        return self.callback_s - (self.base_s if self.replaced else 0.0)


_TIMINGS: list[ProbeTiming] | None = None


@contextmanager
def time_probes() -> Iterator[list[ProbeTiming]]:
    """While active, every probed call is timed (a benchmark's measurement of what scoring costs): the callback,
    then the model's own attention function on the same inputs, which also runs where the callback's output
    replaces it (to time what that saves; its result is then discarded). On CUDA the clock reads follow a
    synchronisation. Not reentrant."""
    global _TIMINGS
    if _TIMINGS is not None:
        raise RuntimeError("time_probes is already active")
    _TIMINGS = timings = []
    try:
        yield timings
    finally:
        _TIMINGS = None


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (a CUDA synchronisation first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _probed_attention(module, query, key, value, attention_mask, **kwargs):
    callback, implementation = _ACTIVE[id(module)]
    base = _base_function(module, implementation)
    if _TIMINGS is not None:
        start = device_clock(query.device)
        output = callback(module, query, key, value, attention_mask, kwargs)
        middle = device_clock(query.device)
        result = base(module, query, key, value, attention_mask, **kwargs)
        end = device_clock(query.device)
        name = type(module).__name__
        _TIMINGS.append(ProbeTiming(name, middle - start, end - middle, output is not None))
        return (output, None) if output is not None else result
    output = callback(module, query, key, value, attention_mask, kwargs)
    if output is not None:
        return output, None
    return base(module, query, key, value, attention_mask, **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probed_attention)  # idempotent


@contextmanager
def probe_attention(modules: Sequence[nn.Module], callback: ProbeCallback) -> Iterator[None]:
    """While active, every call of each module's attention function first passes its queries, keys and values to
    ``callback``; the attention output is the model's own implementation's, bit for bit, unless the callback
    returns one it computed itself (KV-cache scoring does, so that the scored rows are not computed twice)."""
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


def plain_attention(kwargs: dict[str, Any]) -> bool:
    """Whether an attention call's keyword arguments describe plain softmax attention (no sliding window, soft
    cap, attention sinks or dropout): the scoring pass can then compute the call's output itself."""
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks"))
    return not special and not kwargs.get("dropout")


def received_attention_and_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    scaling: float | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``received_attention(queries="all")`` of a self-attention call (q = k) and the call's attention output
    (B, q, H, d), from one pass (``attention_column_sums``) instead of the model's pass plus a scoring pass.
    ``valid`` (B, L): left padding, excluded as keys and as queries."""
    b, h, q, _ = query.shape
    weight = torch.ones(b, q, device=query.device) if valid is None else valid.float().to(query.device)
    sums, _, output = attention_column_sums(
        query, key, weight, causal=causal, scaling=scaling, key_valid=valid, value=value
    )
    assert output is not None
    return sums.sum(dim=1) / (weight.sum(dim=1, keepdim=True) * h).clamp_min(1.0), output


def head_mean_keys(key: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads, (B, KVH, k, d) -> (B, k, d) float32: the similarity metric of token merging."""
    return key.float().mean(dim=1)


#: query rows (over the heads of one key head) per matrix product of the scoring pass (of 32 to 256, the fastest
#: at 4,100 tokens on 2 CPU cores, for 16/16, 16/2 and 28/4 query/key heads)
ROWS_PER_PRODUCT = 256


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    causal: bool = True,
    scaling: float | None = None,
    key_valid: torch.Tensor | None = None,
    sparsity_threshold: float | None = None,
    value: torch.Tensor | None = None,
    chunk: int = ROWS_PER_PRODUCT,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Self-attention (a prefill, or a vision encoder's layer): the attention each key receives from the weighted
    query rows, per query head, ((B, H, L) float32, sparsity, output).

    ``query`` (B, H, L, d), ``key`` (B, KVH, L, d); ``row_weight`` (B, L): each query row's weight in each sample
    (0 leaves it out of the sums). ``causal``: row i sees keys up to i. ``key_valid`` (B, L) marks left padding.
    With ``sparsity_threshold`` t, ``sparsity`` (B,) is the share of the weighted rows' visible entries whose
    probability is below t times their row's maximum, averaged over heads (VL-Cache's measure); else None.
    With ``value`` (B, KVH, L, d), ``output`` (B, L, H, d) is the attention output of every valid row, in the
    layout transformers' attention functions return (padding rows zero), from the same probabilities: the scores
    then cost no second attention pass; else None, and only the weighted rows are computed.

    Each sample runs on its own valid span (no padding mask), a chunk of rows at a time, as the eager softmax
    does it (logits in the inputs' dtype, softmax in float32), and with ``causal`` only over the keys left of the
    chunk's diagonal. The work is split into tasks of one key head (and its query heads) of one sample, each
    writing its own slices of the results. On a CPU the tasks run in parallel, one per thread with one thread
    per operation: a chunk's probabilities then stay in that core's cache between the softmax and the two
    matrix products. At 4,100 tokens on 2 cores the pass with the output measured 1.2-1.4x the time of the
    layer's own sdpa call, against 1.6x for chunks over every head with the threads inside each operation,
    and 2.2-3.6x for sdpa plus a separate scoring pass. On other devices one task per sample covers every head.
    """
    b, h, q, d = query.shape
    if key.shape[2] != q or row_weight.shape != (b, q):
        raise ValueError(f"self-attention expected: query {tuple(query.shape)}, key {tuple(key.shape)}")
    kvh = key.shape[1]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} key heads")
    if sparsity_threshold is not None:  # before any work
        check_relative_threshold(sparsity_threshold, "sparsity_threshold")
    group = h // kvh
    scale = d**-0.5 if scaling is None else scaling
    device = query.device
    sums = torch.zeros(b, h, q, dtype=torch.float32, device=device)
    below = torch.zeros(b, h, dtype=torch.float32, device=device)
    output = None if value is None else torch.zeros(b, q, h, d, dtype=value.dtype, device=value.device)
    work = _ScorePass(
        query, key, value, group, causal, scale, sparsity_threshold, sums, below, output,
        rows_per_chunk=max(1, chunk // group) if device.type == "cpu" else chunk,
    )  # fmt: skip
    per_task = kvh if device.type != "cpu" else 1  # key heads per task
    tasks, visible = [], []
    for s in range(b):
        start = 0 if key_valid is None else int((~key_valid[s].bool()).sum())
        if key_valid is not None and not bool(key_valid[s, start:].all()):
            raise ValueError(f"sample {s}: padding must be on the left")
        weight = row_weight[s, start:].float().to(device)
        counted = weight.nonzero().squeeze(-1)
        rows = torch.arange(q - start, device=device) if value is not None else counted
        visible.append(int((counted + 1).sum()) if causal else counted.numel() * (q - start))
        for first in range(0, kvh, per_task):
            tasks.append(partial(work.run, s, start, slice(first, first + per_task), rows, weight))
    run_tasks(tasks, device)
    sparsity = None
    if sparsity_threshold is not None:
        seen = torch.tensor(visible, dtype=torch.float32, device=device).clamp_min(1.0)
        sparsity = (below / seen[:, None]).mean(dim=1)
    return sums, sparsity, output


@dataclass(frozen=True)
class _ScorePass:
    """The inputs, settings and results of one ``attention_column_sums`` call; ``run`` is one task of it."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor | None
    group: int
    causal: bool
    scale: float
    threshold: float | None
    sums: torch.Tensor
    below: torch.Tensor
    output: torch.Tensor | None
    rows_per_chunk: int

    def run(
        self, s: int, start: int, heads: slice, rows: torch.Tensor, weight: torch.Tensor, scratch: Scratch
    ) -> None:
        """Sample ``s`` (valid from ``start``), key heads ``heads`` and their query heads, query ``rows``."""
        group, step = self.group, self.rows_per_chunk
        qh = slice(heads.start * group, heads.stop * group)  # the query heads of these key heads
        unscaled = self.query[s, qh, start:]
        queries = torch.mul(unscaled, self.scale, out=scratch.take("q", unscaled.shape, *_kind(unscaled)))
        keys_t = self.key[s, heads, start:].transpose(-1, -2)  # (nk, d, n)
        values = self.value[s, heads, start:] if self.value is not None else None
        nk, (hq, n, d) = keys_t.shape[0], queries.shape
        below = torch.zeros(hq, dtype=torch.float32, device=queries.device)
        row_weight = weight[rows]
        # rows in one run (every row, or a suffix such as the queries after an image): slices, and one causal
        # triangle for every chunk; else gathers and a mask per chunk
        contiguous = rows.numel() > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.numel()
        if self.causal and contiguous:
            triangle = torch.ones(step, step, dtype=torch.bool, device=queries.device).triu_(1)
        for first in range(0, rows.numel(), step):
            idx = rows[first : first + step]  # (c,) ascending
            c, low = idx.numel(), int(idx[0])
            width = (int(idx[-1]) + 1) if self.causal else n
            picked = queries[:, low : low + c] if contiguous else queries[:, idx]
            logits = scratch.take("logits", (nk, group * c, width), *_kind(queries))
            torch.matmul(picked.reshape(nk, group * c, d), keys_t[..., :width], out=logits)
            logits = logits.view(hq, c, width)
            if self.causal and contiguous:
                logits[..., low:width].masked_fill_(triangle[:c, :c], float("-inf"))
            elif self.causal and low + 1 < width:
                # only keys right of the chunk's first row can be in the future of some row
                future = torch.arange(low + 1, width, device=idx.device)[None, :] > idx[:, None]
                logits[..., low + 1 :].masked_fill_(future, float("-inf"))
            probs = scratch.take("probs", (hq, c, width), torch.float32, queries.device)
            torch.softmax(logits, dim=-1, dtype=torch.float32, out=probs)
            w = row_weight[first : first + c]
            if bool(w.any()):
                self.sums[s, qh, start : start + width] += torch.matmul(w[None, None, :], probs)[:, 0]
                if self.threshold is not None:
                    count = count_below(probs, self.threshold, logits)  # (hq, c)
                    if self.causal:  # masked entries are 0, below any threshold: take them out by count
                        count.sub_((width - 1 - idx).float())
                    below += count.mul_((w != 0).float()).sum(dim=-1)
            if values is not None:  # every row, so contiguous
                # as eager attention: the probabilities in the values' dtype times the values
                mixed = torch.matmul(probs.to(values.dtype).reshape(nk, group * c, width), values[:, :width])
                self.output[s, start + low : start + low + c, qh] = mixed.reshape(hq, c, d).transpose(0, 1)
        if self.threshold is not None:
            self.below[s, qh] = below


def _kind(tensor: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    return tensor.dtype, tensor.device
