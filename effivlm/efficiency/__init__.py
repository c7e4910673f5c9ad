"""Efficiency measurement: analytic FLOPs (and, alongside, timing, memory and KV bytes)."""

from effivlm.efficiency.flops import (
    DecoderShape,
    attention_flops,
    decode_flops,
    encoder_flops,
    layer_flops,
    linear_flops,
    lm_head_flops,
    prefill_flops,
    tokens_per_layer_for,
)

__all__ = [
    "DecoderShape",
    "attention_flops",
    "decode_flops",
    "encoder_flops",
    "layer_flops",
    "linear_flops",
    "lm_head_flops",
    "prefill_flops",
    "tokens_per_layer_for",
]
