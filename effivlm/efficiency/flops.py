"""Analytic FLOPs of a decoder-only language model, for prefill and per decoded token.

Pure functions on plain numbers; no model is needed. A multiply-accumulate counts as 2 FLOPs.

What is counted, per decoder layer:

* the q/k/v/o projections (q and o: ``hidden x heads*head_dim``; k and v: ``hidden x kv_heads*head_dim``),
* the attention scores ``Q K^T`` and the weighted sum ``A V`` (``2 * head_dim * heads`` per query/key pair each),
* the SwiGLU MLP (gate, up and down: three ``hidden x intermediate`` matrices),

plus the LM head (``hidden x vocab``) for the positions whose logits are computed.

What is ignored, because it is small next to the matmuls: norms, rotary embeddings, softmax, the SwiGLU
activation and product, residual adds, biases and the embedding lookup.

Causal prefill counts only the query/key pairs the mask lets through: ``n * (n + 1) / 2`` for ``n`` tokens,
not the full ``n x n`` score matrix. The vision tower (and projector) is counted separately, not here: these
functions see only the tokens that reach the language model.

Methods that drop tokens are described by the token count of every layer (``tokens_per_layer_for``) for
prefill and by the KV length of every layer for decoding, so the same functions serve dense and compressed runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from effivlm.methods.base import kept_count


@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a decoder-only LM that determine its FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    #: per-layer MLP widths when they differ from ``intermediate`` (a structurally pruned model, CFSP);
    #: empty: every layer has ``intermediate`` channels
    intermediates: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderShape.{name} must be a positive int, got {value!r}")
        widths = tuple(self.intermediates)
        if widths and (len(widths) != self.layers or any(not isinstance(w, int) or w <= 0 for w in widths)):
            raise ValueError(
                f"DecoderShape.intermediates must hold {self.layers} positive ints, one per layer, got {widths}"
            )
        object.__setattr__(self, "intermediates", widths)

    def mlp_width(self, layer: int | None) -> int:
        """The MLP width of ``layer`` (``None``: the config's ``intermediate``)."""
        return self.intermediates[layer] if self.intermediates and layer is not None else self.intermediate

    @classmethod
    def from_config(cls, text_config: Any) -> DecoderShape:
        """Read a transformers text config (Qwen2/Llama style field names)."""
        hidden = text_config.hidden_size
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=text_config.intermediate_size,
            layers=text_config.num_hidden_layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=text_config.vocab_size,
        )

    @classmethod
    def from_model(cls, text_config: Any, layers: Sequence[Any]) -> DecoderShape:
        """:meth:`from_config` with each decoder layer's actual MLP width (the input width of its
        ``mlp.down_proj``), so that channels a structured method removed are not counted."""
        shape = cls.from_config(text_config)
        widths = tuple(int(layer.mlp.down_proj.in_features) for layer in layers)
        if len(widths) != shape.layers:
            raise ValueError(f"{len(widths)} decoder layers given, the config has {shape.layers}")
        if all(w == shape.intermediate for w in widths):
            return shape
        return dataclasses.replace(shape, intermediates=widths)


def linear_flops(shape: DecoderShape, n_tokens: int, layer: int | None = None) -> float:
    """FLOPs of one layer's projections and MLP for ``n_tokens`` tokens (no attention over keys); ``layer``
    picks that layer's MLP width when the widths differ."""
    q_o = 2 * shape.hidden * shape.heads * shape.head_dim  # q and o
    k_v = 2 * shape.hidden * shape.kv_heads * shape.head_dim  # k and v
    mlp = 3 * shape.hidden * shape.mlp_width(layer)  # gate, up, down
    return 2.0 * n_tokens * (q_o + k_v + mlp)


def attention_flops(shape: DecoderShape, n_pairs: int) -> float:
    """FLOPs of the scores and the weighted sum of one layer over ``n_pairs`` query/key pairs."""
    return 2 * (2.0 * n_pairs * shape.heads * shape.head_dim)


def _attended_pairs(n_query: int, n_kv: int, causal: bool) -> int:
    if not causal:
        return n_query * n_kv
    # The queries are the last n_query of the n_kv positions: query i sees n_kv - n_query + i + 1 keys.
    return n_query * (n_kv - n_query) + n_query * (n_query + 1) // 2


def layer_flops(
    shape: DecoderShape, n_query: int, n_kv: int, causal: bool = False, layer: int | None = None
) -> float:
    """FLOPs of one decoder layer: ``n_query`` new tokens attending over ``n_kv`` cached+new keys.

    With ``causal`` the new tokens see only the keys up to their own position; without it every query sees
    all ``n_kv`` keys. For a single query (decoding) the two agree.
    """
    if n_query < 0 or n_kv < n_query:
        raise ValueError(f"need 0 <= n_query <= n_kv, got n_query={n_query}, n_kv={n_kv}")
    pairs = _attended_pairs(n_query, n_kv, causal)
    return linear_flops(shape, n_query, layer) + attention_flops(shape, pairs)


def lm_head_flops(shape: DecoderShape, n_tokens: int) -> float:
    """FLOPs of the LM head for ``n_tokens`` positions."""
    return 2.0 * n_tokens * shape.hidden * shape.vocab


def _check_per_layer(shape: DecoderShape, counts: Sequence[int], what: str) -> None:
    if len(counts) != shape.layers:
        raise ValueError(f"{what} has {len(counts)} entries, the model has {shape.layers} layers")
    if any(c < 0 for c in counts):
        raise ValueError(f"{what} must be non-negative, got {list(counts)}")


def prefill_flops(shape: DecoderShape, tokens_per_layer: Sequence[int], lm_head_tokens: int = 1) -> float:
    """FLOPs of a causal prefill in which layer ``l`` processes ``tokens_per_layer[l]`` tokens.

    ``lm_head_tokens`` is the number of positions whose logits are computed (1 for generation).
    """
    _check_per_layer(shape, tokens_per_layer, "tokens_per_layer")
    total = sum(layer_flops(shape, n, n, causal=True, layer=i) for i, n in enumerate(tokens_per_layer))
    return total + lm_head_flops(shape, lm_head_tokens)


def decode_flops(shape: DecoderShape, kv_per_layer: Sequence[int]) -> float:
    """FLOPs of decoding one token when layer ``l`` holds ``kv_per_layer[l]`` cached keys (before this token)."""
    _check_per_layer(shape, kv_per_layer, "kv_per_layer")
    total = sum(layer_flops(shape, 1, kv + 1, layer=i) for i, kv in enumerate(kv_per_layer))
    return total + lm_head_flops(shape, 1)


def encoder_flops(linear_params: int, layers: int, width: int, sequences: Sequence[int]) -> float:
    """FLOPs of a bidirectional encoder (a vision tower) over independent sequences of the given lengths.

    Every linear weight costs 2 FLOPs per token; every layer's attention costs 4 * ``width`` (query/key width,
    heads times head size) per attended pair, each sequence attending to itself in full. For towers whose
    layers attend within windows (most of Qwen2.5-VL's) this is an upper bound.
    """
    if linear_params < 0 or layers < 0 or width < 0 or any(n < 0 for n in sequences):
        raise ValueError("encoder_flops: sizes must be non-negative")
    tokens = sum(sequences)
    pairs = sum(n * n for n in sequences)
    return 2.0 * linear_params * tokens + layers * 4.0 * width * pairs


def tokens_per_layer_for(
    prompt_tokens: int, visual_tokens: int, keep: float, layer_k: int, layers: int
) -> list[int]:
    """Token count of every layer when ``kept_count(keep, visual_tokens)`` visual tokens remain from ``layer_k`` on.

    ``prompt_tokens`` are the non-visual tokens (always kept). ``layer_k = 0`` means the visual tokens are
    reduced before the language model (random, pool); ``layer_k = K`` means layers ``0..K-1`` see every token
    and layers ``K..`` the kept ones (FastV-style). The same list serves as the per-layer KV length after
    prefill.
    """
    if prompt_tokens < 0 or visual_tokens < 0:
        raise ValueError(
            f"token counts must be non-negative, got prompt={prompt_tokens}, visual={visual_tokens}"
        )
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if not 0 <= layer_k <= layers:
        raise ValueError(f"layer_k must be in [0, {layers}], got {layer_k}")
    full = prompt_tokens + visual_tokens
    reduced = prompt_tokens + kept_count(keep, visual_tokens)
    return [full if layer < layer_k else reduced for layer in range(layers)]
