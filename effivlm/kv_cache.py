"""KV-cache compression (StreamingLLM, H2O, SnapKV and kin): the prompt's cache really shrinks, under sdpa.

During the prefill, probes on every decoder layer's attention (only for methods that need scores) sum the
attention each prompt entry receives from the method's query rows, a chunk of rows at a time, and, for
VL-Cache, measure the layer's attention sparsity. When the prefill ends, ``compress`` asks the method which
entries each layer keeps, per sample, and replaces every layer's keys and values in the transformers cache by
just those entries (left-padded across the batch when samples keep different counts). Layers may keep
different counts (PyramidKV, VL-Cache), so during decoding a pre-hook on each decoder layer hands it the mask
over its own cache. Decode positions come from the uncompressed prompt (the engine passes them explicitly, the
3-D rope of the Qwen-VL families included), never from the cache length. At budget 1.0 nothing is probed,
hooked or replaced, so dense outputs are reproduced exactly. Leaving the context removes every hook and probe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Cache

from effivlm.attention import (
    ROWS_PER_PRODUCT,
    attention_column_sums,
    device_clock,
    plain_attention,
    probe_attention,
)
from effivlm.layer_pruning import decode_mask, repack_left
from effivlm.methods.base import KVCacheMethod, KVContext
from effivlm.ops import gather_rows

#: query rows per chunk of attention probabilities when scoring (see ``attention_column_sums``)
SCORE_CHUNK = ROWS_PER_PRODUCT
#: the scoring pass computes the layer's attention output itself when its rows hold at least this share of the
#: prefill's attention work: one pass over every row then costs less than the model's own pass plus the scored
#: rows' (with the output, the pass measured 1.2-1.4x an sdpa call at 4,100 tokens on 2 CPU cores)
OUTPUT_SHARE = 0.3


_COMPRESSIONS: list[float] | None = None


@contextmanager
def time_compression() -> Iterator[list[float]]:
    """While active, the wall time (seconds) of every ``KVCompression.compress`` call is appended to the
    yielded list (a benchmark's measurement of what selecting, merging and cutting the caches cost; on CUDA the
    clock reads follow a synchronisation). Not reentrant."""
    global _COMPRESSIONS
    if _COMPRESSIONS is not None:
        raise RuntimeError("time_compression is already active")
    _COMPRESSIONS = times = []
    try:
        yield times
    finally:
        _COMPRESSIONS = None


def entry_bytes(cache: Cache) -> list[int]:
    """Bytes one cached token takes in each layer: its key and value over every KV head."""
    return [
        layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        + layer.values.shape[1] * layer.values.shape[-1] * layer.values.element_size()
        for layer in cache.layers
    ]


class KVCompression:
    """Compresses the prompt's KV cache with ``method`` at the end of the prefill.

    ``valid`` (B, L): the prefill's attention mask (left padding); ``is_image`` (B, L): visual-token entries.
    Use as a context around the prefill forward and the decode steps; call ``compress`` between them.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        attention_of: Any,
        method: KVCacheMethod,
        valid: torch.Tensor,
        is_image: torch.Tensor,
        implementation: str,
    ) -> None:
        self.layers, self.attention_of, self.method = layers, attention_of, method
        self.valid = valid.bool()
        self.is_image = is_image.bool() & self.valid
        self.implementation = implementation
        self.active = method.budget < 1.0
        self.lengths = self.valid.sum(dim=1).tolist()
        n = len(layers)
        self.scores: list[torch.Tensor | None] = [None] * n  # (B, KVH, L) per layer
        self.sparsity: list[torch.Tensor | None] = [None] * n  # (B,) per layer
        self.layer_valid: list[torch.Tensor] | None = None  # (B, k_l) per layer, after compression
        self.kept: list[list[int]] = [[length] * n for length in self.lengths]  # entries per sample and layer
        self.in_prefill = True
        self._row_weight = self._query_rows()
        self._scored_share = self._work_share()
        self._stack: ExitStack | None = None

    def _query_rows(self) -> torch.Tensor | None:
        """(B, L) 0/1 weights of the query rows whose attention the method's scores sum."""
        if self.method.query_rows == "none":
            return None
        rows = []
        for b, length in enumerate(self.lengths):
            mask = self.method.query_mask(self.is_image[b, self.valid.shape[1] - length :])
            assert mask is not None
            rows.append(mask.float())
        return repack_left(rows, 0.0)

    def _work_share(self) -> float:
        """The scored rows' share of the causal prefill's attention work (row i of a sample's own span attends
        to i + 1 keys)."""
        if self._row_weight is None:
            return 0.0
        work = self.valid.double().cumsum(dim=1) * self.valid  # (B, L): 1, 2, ... along each valid span
        scored = work * (self._row_weight.to(work.device) != 0)
        return float(scored.sum() / work.sum().clamp_min(1.0))

    def __enter__(self) -> KVCompression:
        stack = ExitStack()
        if self.active and self._row_weight is not None:
            modules = [self.attention_of(layer) for layer in self.layers]
            index = {id(m): i for i, m in enumerate(modules)}
            stack.enter_context(probe_attention(modules, partial(self._score, index)))
        if self.active:
            for i, layer in enumerate(self.layers):
                hook = partial(self._pre_hook, i)
                stack.callback(layer.register_forward_pre_hook(hook, with_kwargs=True).remove)
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()

    # ------------------------------------------------------------------ prefill
    def _score(
        self, index: dict[int, int], module, query, key, value, attention_mask, kwargs
    ) -> torch.Tensor | None:
        if not self.in_prefill:
            return None
        assert self._row_weight is not None
        sums, sparsity, output = attention_column_sums(
            query,
            key,
            self._row_weight.to(query.device),
            scaling=kwargs.get("scaling"),
            key_valid=self.valid,
            sparsity_threshold=self.method.sparsity_threshold,
            value=value if self._computes_output(kwargs) else None,
            chunk=SCORE_CHUNK,
        )
        b, h, length = sums.shape
        kv_heads = key.shape[1]
        layer = index[id(module)]
        self.scores[layer] = sums.view(b, kv_heads, h // kv_heads, length).sum(dim=2)  # GQA groups summed
        self.sparsity[layer] = sparsity
        return output

    def _computes_output(self, kwargs: dict[str, Any]) -> bool:
        """Whether the scoring pass also gives the layer its attention output, so that the scored rows are not
        computed a second time: when they hold at least ``OUTPUT_SHARE`` of the attention work (H2O and LOOK-M
        score every row, VL-Cache the rows after the image; SnapKV's window is a few rows) and the layer's
        attention is plain causal softmax attention (no sliding window, soft cap, attention sinks or dropout)."""
        return self._scored_share >= OUTPUT_SHARE and plain_attention(kwargs)

    def compress(self, cache: Cache) -> torch.Tensor:
        """Cut every layer's prompt cache to what the method keeps; returns the 2-D mask over layer 0's cache."""
        if _COMPRESSIONS is None:
            return self._compress(cache)
        times, device = _COMPRESSIONS, self.valid.device
        start = device_clock(device)
        mask = self._compress(cache)
        times.append(device_clock(device) - start)
        return mask

    def _compress(self, cache: Cache) -> torch.Tensor:
        self.in_prefill = False
        if not self.active:
            return self.valid.long()
        if len(cache.layers) != len(self.layers):
            raise RuntimeError(f"the cache has {len(cache.layers)} layers, the model {len(self.layers)}")
        for i, layer in enumerate(cache.layers):
            if getattr(layer, "is_sliding", False):
                raise ValueError(
                    f"layer {i} uses a sliding-window cache, which KV-cache methods do not support"
                )
            if self.method.query_rows != "none" and self.scores[i] is None:
                raise RuntimeError(f"layer {i} never ran its attention during the prefill")
        n = len(self.layers)
        padded = self.valid.shape[1]
        capacities, windows = [], []
        for b, length in enumerate(self.lengths):
            sparsity = None
            if self.method.sparsity_threshold is not None:
                sparsity = [float(s[b]) for s in self.sparsity if s is not None]
            capacities.append(self.method.layer_capacities(length, n, sparsity))
            windows.append(self.method.window_size(self.method.capacity(length)))
        self.layer_valid = []
        for i, layer in enumerate(cache.layers):
            keys, values = [], []
            for b, length in enumerate(self.lengths):
                start = padded - length
                scores = self.scores[i]
                ctx = KVContext(
                    keys=layer.keys[b, :, start:],
                    values=layer.values[b, :, start:],
                    scores=scores[b, :, start:] if scores is not None else None,
                    is_image=self.is_image[b, start:],
                    capacity=min(capacities[b][i], length),
                    window=min(windows[b], capacities[b][i], length),
                    layer_index=i,
                )
                chosen = self.method.select(ctx)
                index = chosen.indices.to(layer.keys.device)
                k = chosen.keys if chosen.keys is not None else gather_rows(ctx.keys, index)
                v = chosen.values if chosen.values is not None else gather_rows(ctx.values, index)
                keys.append(k.transpose(0, 1))  # (k, KVH, d) for left repacking
                values.append(v.transpose(0, 1))
                self.kept[b][i] = int(index.shape[1])
            layer.keys = repack_left(keys, 0.0).transpose(1, 2).contiguous()
            layer.values = repack_left(values, 0.0).transpose(1, 2).contiguous()
            self.layer_valid.append(
                repack_left([self.valid.new_ones(self.kept[b][i]) for b in range(len(self.lengths))], False)
            )
        self.scores = [None] * n  # not needed any more
        return self.layer_valid[0].long()

    # ------------------------------------------------------------------ decoding
    def _pre_hook(self, index: int, module, args, kwargs):
        if self.in_prefill or self.layer_valid is None:
            return None
        mask = decode_mask(
            self.layer_valid[index],
            kwargs["past_key_values"].get_seq_length(index),
            args[0] if args else kwargs["hidden_states"],
            self.implementation,
            kwargs.get("attention_mask"),
        )
        return args, {**kwargs, "attention_mask": mask}

    # ------------------------------------------------------------------ records
    def kv_tokens(self, b: int) -> list[int]:
        """Entries each layer's cache holds of sample b's prompt after compression."""
        return list(self.kept[b])
