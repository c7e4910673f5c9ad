"""In-LLM visual-token pruning (FastV and kin): scoped hooks on the decoder layers, under sdpa or flash-attention.

Layers before K run on the whole prompt. A probe on layer K - 1's attention computes the attention each token
received from the rows the method asks for. A pre-hook on layer K keeps every text token and each image
segment's top visual tokens, repacks the hidden states with left padding, and hands layers K and later the
matching attention mask, rotary embeddings and position ids gathered from the originals, so every kept token
keeps its original position (the 3-D rope of the Qwen-VL families included). The cache of layers K and later
holds only the kept tokens; during decoding their pre-hooks swap in a mask over that shorter cache. When no
token is dropped (budget 1.0) no hook changes anything, so dense outputs are reproduced exactly. Leaving the
context removes every hook and probe.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from effivlm.attention import (
    plain_attention,
    probe_attention,
    received_attention,
    received_attention_and_output,
)
from effivlm.methods.base import LayerTokenMethod, kept_count


@dataclass(frozen=True)
class SegmentSlots:
    """Where one image segment's visual tokens sit in the prefill sequence of one sample."""

    image_index: int
    slots: torch.Tensor  # (N,) long, ascending


def repack_left(rows: list[torch.Tensor], pad_value: float | int) -> torch.Tensor:
    """Stack per-sample tensors of shape (L_b, ...) into (B, max L_b, ...), padding on the left."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), pad_value)
    for b, r in enumerate(rows):
        out[b, length - r.shape[0] :] = r
    return out


def gather_sequence(t: torch.Tensor, rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Keep sample b's sequence entries ``rows[b]`` of ``t``, whose sequence axis is ``dim`` (negative) and batch
    axis ``dim - 1``; samples are left-padded with zeros to the longest."""
    moved = t.movedim((dim - 1, dim), (0, 1))  # (B, L, ...)
    out = repack_left([moved[b, r] for b, r in enumerate(rows)], 0)
    return out.movedim((0, 1), (dim - 1, dim))


def decode_mask(
    valid: torch.Tensor, cached: int, hidden: torch.Tensor, implementation: str, like: Any
) -> Any:
    """``layer_mask`` for a decode step over a layer cache that holds ``cached`` entries, the first of which are
    the prompt's with padding mask ``valid`` (B, k) and the rest decoded tokens; ``hidden`` (B, q, D) is the
    step's input."""
    q_len = hidden.shape[1]
    grown = valid.new_ones(hidden.shape[0], cached + q_len - valid.shape[1])
    return layer_mask(torch.cat([valid, grown], dim=1), q_len, implementation, hidden.dtype, like)


def layer_mask(valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype, like: Any) -> Any:
    """The attention mask a decoder layer takes for queries that are the last ``q_len`` of ``valid`` (B, kv).

    flash-attention takes the 2-D padding mask (None without padding); sdpa a 4-D boolean causal mask; eager
    (or a model that built a float mask) the additive float form. A padding query attends to itself only, so no
    row is empty.
    """
    if "flash" in implementation:
        return None if bool(valid.all()) else valid.long()
    kv = valid.shape[1]
    query_pos = torch.arange(kv - q_len, kv, device=valid.device)
    key_pos = torch.arange(kv, device=valid.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (q, kv)
    allowed = causal[None, None] & valid.bool()[:, None, None, :]  # (B, 1, q, kv)
    allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None, None]
    if implementation == "eager" or (isinstance(like, torch.Tensor) and like.is_floating_point()):
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


class LayerPruning:
    """Makes decoder layers ``method.layer`` and later run on the visual tokens ``method`` keeps.

    ``valid`` (B, L): the prefill's attention mask; ``segments[b]``: sample b's image segments. Use as a context
    around the prefill forward and the decode steps, and call ``finish_prefill`` between them.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        attention_of: Any,
        method: LayerTokenMethod,
        valid: torch.Tensor,
        segments: list[list[SegmentSlots]],
        implementation: str,
    ) -> None:
        method.check_depth(len(layers))
        self.layers, self.attention_of, self.method = layers, attention_of, method
        self.k = method.layer
        self.valid = valid.bool()
        self.segments = segments
        self.implementation = implementation
        self.scores: torch.Tensor | None = None  # (B, L) attention received in layer K - 1
        self.rows: list[torch.Tensor] | None = None  # kept prefill rows per sample; None when nothing dropped
        self.short_valid: torch.Tensor | None = None  # (B, L') the kept tokens' padding mask
        self.prefill_kwargs: dict[str, Any] = {}
        self.decode_mask: Any = None
        self.in_prefill = True
        self.kept: list[list[int]] = [[] for _ in segments]  # visual tokens kept per image, per sample
        self._stack: ExitStack | None = None

    def __enter__(self) -> LayerPruning:
        stack = ExitStack()
        stack.enter_context(probe_attention([self.attention_of(self.layers[self.k - 1])], self._score))
        for index in range(self.k, len(self.layers)):
            hook = partial(self._pre_hook, index)
            stack.callback(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True).remove)
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stack is not None
        self._stack.close()

    def finish_prefill(self) -> None:
        if self.in_prefill and self.scores is None:
            raise RuntimeError(f"layer {self.k - 1} never ran its attention during the prefill")
        self.in_prefill = False

    # ------------------------------------------------------------------ prefill
    def _score(self, module, query, key, value, attention_mask, kwargs) -> torch.Tensor | None:
        if not self.in_prefill:
            return None
        if self.method.score_queries == "all" and plain_attention(kwargs) and key.shape[2] == query.shape[2]:
            # every query's row is needed: the scoring pass computes the layer's attention output too
            self.scores, output = received_attention_and_output(
                query, key, value, causal=True, scaling=kwargs.get("scaling"), valid=self.valid
            )
            return output
        self.scores = received_attention(
            query,
            key,
            queries=self.method.score_queries,
            scaling=kwargs.get("scaling"),
            causal=True,
            key_valid=self.valid,
            query_valid=self.valid,
        )

    def _select(self) -> None:
        assert self.scores is not None
        keep = self.valid.clone()
        for b, segments in enumerate(self.segments):
            per_image: dict[int, int] = {}
            for seg in segments:
                slots = seg.slots.to(keep.device)
                k = kept_count(self.method.budget, slots.numel())
                chosen = self.method.select(self.scores[b, slots], k)
                keep[b, slots] = False
                keep[b, slots[chosen]] = True
                per_image[seg.image_index] = per_image.get(seg.image_index, 0) + k
            self.kept[b] = [per_image[i] for i in sorted(per_image)]
        if bool(torch.equal(keep, self.valid)):
            return  # nothing dropped: layers run unchanged
        self.rows = [keep[b].nonzero().squeeze(-1) for b in range(keep.shape[0])]
        self.short_valid = repack_left([self.valid[b, r] for b, r in enumerate(self.rows)], False)

    def _shorten(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        assert self.rows is not None and self.short_valid is not None
        new: dict[str, Any] = {}
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            new["position_embeddings"] = tuple(gather_sequence(t, self.rows, -2) for t in cos_sin)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor):
            new["position_ids"] = gather_sequence(position_ids, self.rows, -1)
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor):
            new["cache_position"] = torch.arange(self.short_valid.shape[1], device=cache_position.device)
        new["attention_mask"] = layer_mask(
            self.short_valid,
            self.short_valid.shape[1],
            self.implementation,
            hidden.dtype,
            kwargs.get("attention_mask"),
        )
        return new

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, index: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.in_prefill:
            if index == self.k:
                self._select()
                if self.rows is not None:
                    self.prefill_kwargs = self._shorten(hidden, kwargs)
                    hidden = gather_sequence(hidden, self.rows, -2)
            if self.rows is None:
                return None
            kwargs = {**kwargs, **self.prefill_kwargs}
        else:
            if self.rows is None:
                return None
            if index == self.k:
                assert self.short_valid is not None
                self.decode_mask = decode_mask(
                    self.short_valid,
                    kwargs["past_key_values"].get_seq_length(self.k),
                    hidden,
                    self.implementation,
                    kwargs.get("attention_mask"),
                )
            kwargs = {**kwargs, "attention_mask": self.decode_mask}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # ------------------------------------------------------------------ records
    def layer_tokens(self, b: int) -> list[int]:
        """Sequence length each decoder layer saw in sample b's prefill."""
        full = int(self.valid[b].sum())
        short = full if self.rows is None else int(self.rows[b].numel())
        return [full] * self.k + [short] * (len(self.layers) - self.k)

    def layer_visual(self, b: int) -> list[int]:
        """Visual tokens each decoder layer saw in sample b's prefill."""
        total = sum(int(s.slots.numel()) for s in self.segments[b])
        return [total] * self.k + [sum(self.kept[b])] * (len(self.layers) - self.k)
