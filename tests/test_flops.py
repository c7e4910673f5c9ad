"""Analytic FLOPs: hand counts, agreement with a real model's weights, and the effect of dropping tokens."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2Model

from effivlm.efficiency import (
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

TINY = DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
QWEN2_7B = DecoderShape(
    hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064
)


def test_dense_prefill_matches_hand_count():
    n = 3
    # multiply-accumulates per token and layer: q 8*8, k 8*4, v 8*4, o 8*8, gate/up/down 3 * 8*16
    macs_per_token = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    # causal pairs 3*4/2 = 6; scores and weighted sum: heads * head_dim = 2*4 MACs per pair each
    attn_macs = (n * (n + 1) // 2) * (2 * 4 + 2 * 4)
    per_layer = 2 * (n * macs_per_token + attn_macs)
    lm_head = 2 * 8 * 10
    assert per_layer == 3648
    assert prefill_flops(TINY, [n, n]) == 2 * per_layer + lm_head == 7456


def test_from_config_and_linear_term_match_model_weights():
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    shape = DecoderShape.from_config(config)
    assert shape == DecoderShape(
        hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128
    )

    torch.manual_seed(0)
    model = Qwen2Model(config)
    n_tokens = 7
    for layer in model.layers:
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        assert linear_flops(shape, n_tokens) == 2 * weights * n_tokens
    # the LM head has the embedding's shape (vocab x hidden)
    assert lm_head_flops(shape, n_tokens) == 2 * model.embed_tokens.weight.numel() * n_tokens


def test_keeping_ten_percent_after_layer_two_reduces_prefill():
    prompt, visual, keep, k = 50, 1000, 0.1, 2
    counts = tokens_per_layer_for(prompt, visual, keep, k, QWEN2_7B.layers)
    assert counts == [1050] * 2 + [150] * 26

    dense = prefill_flops(QWEN2_7B, tokens_per_layer_for(prompt, visual, 1.0, 0, QWEN2_7B.layers))
    pruned = prefill_flops(QWEN2_7B, counts)

    def one_layer(n: int) -> float:
        s = QWEN2_7B
        proj = (
            2 * n * s.hidden * (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 3 * s.intermediate)
        )
        attn = 2 * 2 * (n * (n + 1) / 2) * s.heads * s.head_dim
        return proj + attn

    expected_saving = 26 * (one_layer(1050) - one_layer(150))
    assert dense - pruned == pytest.approx(expected_saving, rel=1e-12)
    # the 26 pruned layers cost roughly 1/7 of their dense price: the saving is about 26/28 * 6/7 of dense
    assert 0.75 < (dense - pruned) / dense < 0.80


def test_tokens_per_layer_before_the_llm_and_rounding():
    assert tokens_per_layer_for(10, 576, 0.1, 0, 3) == [10 + math.ceil(57.6)] * 3
    assert tokens_per_layer_for(10, 10, 0.3, 1, 2) == [20, 13]
    with pytest.raises(ValueError, match="layer_k"):
        tokens_per_layer_for(10, 10, 0.5, 5, 4)
    with pytest.raises(ValueError, match="keep"):
        tokens_per_layer_for(10, 10, 0.0, 0, 4)


def test_decode_grows_linearly_with_kv_length():
    short = decode_flops(QWEN2_7B, [100] * QWEN2_7B.layers)
    long = decode_flops(QWEN2_7B, [400] * QWEN2_7B.layers)
    # only the attention over the 300 extra keys differs, in every layer
    assert long - short == QWEN2_7B.layers * attention_flops(QWEN2_7B, 300)
    assert decode_flops(QWEN2_7B, [700] * QWEN2_7B.layers) - long == long - short


def test_causal_layer_flops_agree_for_one_query():
    assert layer_flops(TINY, 1, 9, causal=True) == layer_flops(TINY, 1, 9)
    assert layer_flops(TINY, 4, 4, causal=False) - layer_flops(TINY, 4, 4, causal=True) == attention_flops(
        TINY, 6
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="layers"):
        prefill_flops(TINY, [3])
    with pytest.raises(ValueError, match="n_query"):
        layer_flops(TINY, 5, 3)
    with pytest.raises(ValueError, match="hidden"):
        DecoderShape(hidden=0, intermediate=1, layers=1, heads=1, kv_heads=1, head_dim=1, vocab=1)


def test_encoder_flops_counts_weights_per_token_and_pairs_per_sequence():
    # 2 sequences of 3 and 4 tokens, 10 linear weights, 2 layers of width 5
    assert encoder_flops(10, 2, 5, [3, 4]) == 2 * 10 * 7 + 2 * 4 * 5 * (9 + 16)
    # one long sequence costs more attention than the same tokens split into two
    assert encoder_flops(0, 1, 8, [8]) > encoder_flops(0, 1, 8, [4, 4])
    with pytest.raises(ValueError, match="non-negative"):
        encoder_flops(-1, 1, 1, [1])
