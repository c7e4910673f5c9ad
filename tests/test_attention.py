"""Attention probes and chunked score math: against an explicit softmax and against eager attention."""

from __future__ import annotations

import math
import time

import pytest
import torch

from effivlm import attention as attention_module
from effivlm import parallel
from effivlm.attention import (
    attention_column_sums,
    attention_probabilities,
    head_mean_keys,
    probe_attention,
    received_attention,
    time_probes,
)
from effivlm.backbones import available_families
from effivlm.backbones.loading import load_backbone
from effivlm.methods import build_method
from effivlm.pipeline import Pipeline, Prompt

# ---------------------------------------------------------------------------- slow references


def naive_probabilities(query, key, *, scaling=None, causal=False, key_valid=None):
    """softmax(Q K^T * scale + mask), float64, one (sample, head, query) row at a time: (B, H, q, k)."""
    b, h, q, d = query.shape
    kvh, k = key.shape[1], key.shape[2]
    group = h // kvh  # query head j reads key head j // group
    scale = d**-0.5 if scaling is None else scaling
    out = torch.zeros(b, h, q, k, dtype=torch.float64)
    for s in range(b):
        for j in range(h):
            for i in range(q):
                logits = []
                for t in range(k):
                    visible = (not causal or t <= k - q + i) and (key_valid is None or bool(key_valid[s, t]))
                    dot = float(query[s, j, i].double() @ key[s, j // group, t].double()) * scale
                    logits.append(dot if visible else None)
                seen = [x for x in logits if x is not None]
                if not seen:
                    continue  # a padding query: all zeros
                top = max(seen)
                total = sum(math.exp(x - top) for x in seen)
                for t, x in enumerate(logits):
                    if x is not None:
                        out[s, j, i, t] = math.exp(x - top) / total
    return out


def naive_received(query, key, *, queries="all", query_valid=None, **mask):
    """Mean over heads and the chosen (valid) queries of the explicit probabilities: (B, k)."""
    probs = naive_probabilities(query, key, **mask)  # (B, H, q, k)
    q = query.shape[2]
    rows = {"all": list(range(q)), "last": [q - 1], "first": [0]}[queries]
    out = torch.zeros(query.shape[0], key.shape[2], dtype=torch.float64)
    for s in range(query.shape[0]):
        chosen = [i for i in rows if queries != "all" or query_valid is None or bool(query_valid[s, i])]
        for i in chosen:
            out[s] += probs[s, :, i].mean(0)
        out[s] /= max(len(chosen), 1)
    return out


def random_qk(b=2, h=4, kvh=2, q=10, k=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, q, d, generator=g), torch.randn(b, kvh, k, d, generator=g)


def left_padding(b, length, pads):
    valid = torch.ones(b, length, dtype=torch.bool)
    for s, p in enumerate(pads):
        valid[s, :p] = False
    return valid


def all_probabilities(query, key, **kwargs):
    """Concatenate the chunks of ``attention_probabilities``, checking they come in row order."""
    rows, chunks = zip(*attention_probabilities(query, key, **kwargs), strict=True)
    k = key.shape[2]
    # causal chunks stop at their last visible key: the keys right of it have probability zero
    full = [torch.nn.functional.pad(c, (0, k - c.shape[-1])) for c in chunks]
    return torch.cat(rows), torch.cat(full, dim=2)


# ---------------------------------------------------------------------------- score math


@pytest.mark.parametrize(
    ("q", "k", "causal"), [(10, 10, False), (10, 10, True), (4, 10, True), (1, 10, True), (4, 10, False)]
)
def test_probabilities_match_an_explicit_softmax_under_gqa(q, k, causal):
    query, key = random_qk(q=q, k=k)
    rows, probs = all_probabilities(query, key, causal=causal)
    assert probs.dtype == torch.float32
    assert torch.equal(rows, torch.arange(q))
    torch.testing.assert_close(
        probs.double(), naive_probabilities(query, key, causal=causal), atol=1e-6, rtol=1e-5
    )


def test_grouped_heads_read_their_own_key_head():
    # with kv head 1 all zeros, query heads 2 and 3 (group 2 of H=4, KVH=2) see uniform attention, heads 0, 1 do not
    query, key = random_qk(q=5, k=5)
    key[:, 1] = 0.0
    _, probs = all_probabilities(query, key)
    torch.testing.assert_close(probs[:, 2:], torch.full_like(probs[:, 2:], 1 / 5))
    assert not torch.allclose(probs[:, :2], torch.full_like(probs[:, :2], 1 / 5))


def test_causal_queries_are_the_last_of_the_keys():
    query, key = random_qk(q=3, k=7)
    _, probs = all_probabilities(query, key, causal=True)
    for i in range(3):
        last = 7 - 3 + i
        assert torch.all(probs[:, :, i, last + 1 :] == 0)
        assert torch.all(probs[:, :, i, : last + 1] > 0)


def test_scaling_is_used_instead_of_the_default():
    query, key = random_qk(q=4, k=6)
    _, probs = all_probabilities(query, key, scaling=0.05)
    torch.testing.assert_close(
        probs.double(), naive_probabilities(query, key, scaling=0.05), atol=1e-6, rtol=1e-5
    )
    _, default = all_probabilities(query, key)
    assert not torch.allclose(probs, default)


def test_left_padding_masks_keys_and_padding_queries_get_zeros_not_nan():
    query, key = random_qk(q=10, k=10)
    valid = left_padding(2, 10, [3, 0])
    rows, probs = all_probabilities(query, key, causal=True, key_valid=valid)
    assert not probs.isnan().any()
    # sample 0's first three queries see only padding keys
    assert torch.all(probs[0, :, :3] == 0)
    assert torch.all(probs[0, :, :, :3] == 0)
    torch.testing.assert_close(probs[0, :, 3:].sum(-1), torch.ones(4, 7))
    torch.testing.assert_close(probs[1].sum(-1), torch.ones(4, 10))
    torch.testing.assert_close(
        probs.double(), naive_probabilities(query, key, causal=True, key_valid=valid), atol=1e-6, rtol=1e-5
    )


def test_fully_masked_rows_without_causality_are_zero():
    query, key = random_qk(q=4, k=6)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[1, 2] = True
    _, probs = all_probabilities(query, key, key_valid=valid)
    assert not probs.isnan().any()
    assert torch.all(probs[0] == 0)
    assert torch.all(probs[1, :, :, 2] == 1) and probs[1].sum() == 4 * 4


@pytest.mark.parametrize("chunk", [1, 3, 4, 9])
def test_chunks_smaller_than_the_queries_give_the_same_rows(chunk):
    query, key = random_qk(q=10, k=12)
    valid = left_padding(2, 12, [0, 5])
    one_rows, one = all_probabilities(query, key, causal=True, key_valid=valid)
    rows, chunked = all_probabilities(query, key, causal=True, key_valid=valid, chunk=chunk)
    assert torch.equal(rows, one_rows)
    torch.testing.assert_close(chunked, one, atol=1e-7, rtol=1e-6)
    sizes = [idx.numel() for idx, _ in attention_probabilities(query, key, chunk=chunk)]
    assert sizes == [min(chunk, 10 - s) for s in range(0, 10, chunk)]


def test_causal_chunks_compute_only_the_keys_left_of_the_diagonal():
    query, key = random_qk(q=10, k=12)
    widths = [p.shape[-1] for _, p in attention_probabilities(query, key, causal=True, chunk=4)]
    assert widths == [2 + 4, 2 + 8, 12]
    widths = [p.shape[-1] for _, p in attention_probabilities(query, key, causal=False, chunk=4)]
    assert widths == [12, 12, 12]


def naive_column_sums(query, key, weight, valid):
    probs = naive_probabilities(query.float(), key.float(), causal=True, key_valid=valid)  # (B, H, q, k)
    return probs, (probs * weight[:, None, :, None].double()).sum(dim=2)


@pytest.mark.parametrize("chunk", [3, 5, 256])
def test_column_sums_and_sparsity_match_the_explicit_softmax(chunk):
    """GQA, left padding, uneven weights, rows left out, chunks cut inside the weighted rows."""
    query, key = random_qk(q=12, k=12, seed=3)
    valid = left_padding(2, 12, [0, 4])
    weight = torch.zeros(2, 12)
    weight[0, 6:] = torch.linspace(0.5, 2.0, 6)  # sample 0: its last six queries, weighted unevenly
    weight[0, 8] = 0.0  # and one of them left out
    weight[1, 4:] = 1.0  # sample 1: every valid query
    sums, sparsity, _ = attention_column_sums(
        query, key, weight, key_valid=valid, sparsity_threshold=0.2, chunk=chunk
    )
    probs, want = naive_column_sums(query, key, weight, valid)
    torch.testing.assert_close(sums.double(), want, atol=1e-6, rtol=1e-5)
    for s in range(2):
        rows = weight[s].nonzero().squeeze(-1)
        below, seen = torch.zeros(4), 0
        for i in rows.tolist():
            visible = [t for t in range(12) if t <= i and bool(valid[s, t])]
            seen += len(visible)
            for j in range(4):
                top = probs[s, j, i].max()
                below[j] += sum(float(probs[s, j, i, t] < 0.2 * top) for t in visible)
        assert float(sparsity[s]) == pytest.approx(float((below / seen).mean()), abs=1e-6)
    assert attention_column_sums(query, key, weight, key_valid=valid)[1] is None


def test_sparsity_threshold_out_of_range_is_named():
    query, key = random_qk(q=4, k=4, seed=1)
    for bad in (0.0, 1e-12, 1.0, 2.0):
        with pytest.raises(ValueError, match="sparsity_threshold must be in"):
            attention_column_sums(query, key, torch.ones(2, 4), sparsity_threshold=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_sums_over_many_rows_match_the_explicit_softmax(dtype):
    """Many chunks of rows, in both float32 and bfloat16 inputs."""
    query, key = random_qk(b=2, h=4, kvh=2, q=40, k=40, d=8, seed=5)
    valid = left_padding(2, 40, [0, 9])
    weight = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) * valid
    weight[0, 5:9] = 0.0
    sums, sparsity, _ = attention_column_sums(
        query.to(dtype), key.to(dtype), weight, key_valid=valid, chunk=8
    )
    assert sparsity is None
    _, want = naive_column_sums(query.to(dtype), key.to(dtype), weight, valid)
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(sums.double(), want, **tolerance)
    assert (sums[1, :, :9] == 0).all()  # padding keys receive nothing


@pytest.mark.parametrize("chunk", [3, 128])
def test_column_sums_also_give_the_attention_output(chunk):
    """With the values, the scoring pass returns the layer's attention output (B, L, H, d) too: sdpa's on every
    valid row, weighted or not, zeros on padding rows."""
    query, key = random_qk(b=2, h=4, kvh=2, q=12, k=12, d=8, seed=7)
    value = torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(8))
    valid = left_padding(2, 12, [0, 4])
    sums, _, output = attention_column_sums(
        query, key, valid.float(), key_valid=valid, value=value, chunk=chunk
    )
    for s, start in ((0, 0), (1, 4)):
        want = torch.nn.functional.scaled_dot_product_attention(
            query[s : s + 1, :, start:],
            key[s : s + 1, :, start:],
            value[s : s + 1, :, start:],
            is_causal=True,
            enable_gqa=True,
        )  # (1, H, n, d)
        torch.testing.assert_close(output[s, start:], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert (output[1, :4] == 0).all()
    torch.testing.assert_close(sums, attention_column_sums(query, key, valid.float(), key_valid=valid)[0])
    # rows left out of the sums still get their output
    some = valid.float()
    some[0, 3] = 0.0
    some_sums, _, some_output = attention_column_sums(
        query, key, some, key_valid=valid, value=value, chunk=chunk
    )
    torch.testing.assert_close(some_output, output)
    torch.testing.assert_close(some_sums, attention_column_sums(query, key, some, key_valid=valid)[0])
    assert not torch.allclose(some_sums, sums)


def test_column_sums_without_the_causal_mask_match_sdpa():
    """A vision encoder's layer: every query sees every key; sums and output are the explicit softmax's."""
    query, key = random_qk(b=1, h=4, kvh=4, q=9, k=9, d=8, seed=11)
    value = torch.randn(1, 4, 9, 8, generator=torch.Generator().manual_seed(12))
    weight = torch.ones(1, 9)
    sums, sparsity, output = attention_column_sums(
        query, key, weight, causal=False, value=value, sparsity_threshold=0.3, chunk=4
    )
    probs = naive_probabilities(query, key)  # (1, H, 9, 9)
    torch.testing.assert_close(sums.double(), probs.sum(dim=2), atol=1e-6, rtol=1e-5)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    torch.testing.assert_close(output, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    top = probs.amax(dim=-1, keepdim=True)
    assert float(sparsity[0]) == pytest.approx(float((probs < 0.3 * top).double().mean()), abs=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_column_sums_are_the_same_on_any_number_of_threads(threads):
    """The per-key-head tasks run on a thread pool when torch has several threads: same results to the bit,
    inference tensors written inside the tasks, and the thread count restored."""
    query, key = random_qk(b=2, h=6, kvh=3, q=30, k=30, d=8, seed=13)
    value = torch.randn(2, 3, 30, 8, generator=torch.Generator().manual_seed(14))
    valid = left_padding(2, 30, [0, 7])
    weight = valid.float()
    weight[0, :10] = 0.0
    before = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        try:
            with torch.inference_mode():
                return attention_column_sums(
                    query, key, weight, key_valid=valid, value=value, sparsity_threshold=0.1, chunk=8
                )
        finally:
            torch.set_num_threads(before)

    single = run(1)
    calls = []
    original = parallel.ThreadPoolExecutor
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "ThreadPoolExecutor", lambda n: calls.append(n) or original(n))
        several = run(threads)
    assert len(calls) == (threads > 1)
    for got, want in zip(several, single, strict=True):
        assert torch.equal(got, want)
    assert torch.get_num_threads() == before


def test_chosen_rows_only():
    query, key = random_qk(q=10, k=10)
    rows, probs = all_probabilities(query, key, causal=True, rows=torch.tensor([2, 7, 9]), chunk=2)
    assert rows.tolist() == [2, 7, 9]
    torch.testing.assert_close(
        probs.double(), naive_probabilities(query, key, causal=True)[:, :, [2, 7, 9]], atol=1e-6, rtol=1e-5
    )


def test_query_heads_not_a_multiple_of_key_heads_fail():
    query, key = random_qk(h=3, kvh=2)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 key heads"):
        next(attention_probabilities(query, key))


@pytest.mark.parametrize("queries", ["all", "last", "first"])
@pytest.mark.parametrize(("q", "k", "causal"), [(10, 10, True), (6, 10, True), (10, 10, False)])
def test_received_attention_matches_the_reference(queries, q, k, causal):
    query, key = random_qk(q=q, k=k, seed=1)
    got = received_attention(query, key, queries=queries, causal=causal, chunk=3)
    assert got.shape == (2, k) and got.dtype == torch.float32
    want = naive_received(query, key, queries=queries, causal=causal)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    # every chosen query's row sums to 1, so does their mean
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


@pytest.mark.parametrize("queries", ["all", "last", "first"])
def test_received_attention_with_left_padding_excludes_padding_queries(queries):
    query, key = random_qk(q=10, k=10, seed=2)
    valid = left_padding(2, 10, [4, 1])
    mask = {"causal": True, "key_valid": valid}
    got = received_attention(query, key, queries=queries, query_valid=valid, chunk=3, **mask)
    want = naive_received(query, key, queries=queries, query_valid=valid, **mask)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert not got.isnan().any()
    assert torch.all(got[0, :4] == 0) and torch.all(got[1, :1] == 0)
    if queries != "first":  # the first query of a padded sample is padding and sees nothing
        torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_padding_queries_count_in_the_mean_unless_excluded():
    query, key = random_qk(q=8, k=8, seed=3)
    valid = left_padding(2, 8, [2, 0])
    counted = received_attention(query, key, causal=True, key_valid=valid)
    excluded = received_attention(query, key, causal=True, key_valid=valid, query_valid=valid)
    torch.testing.assert_close(counted[0] * 8 / 6, excluded[0])
    torch.testing.assert_close(counted[1], excluded[1])


def test_received_attention_of_a_single_query():
    query, key = random_qk(q=1, k=5)
    for queries in ("all", "last", "first"):
        got = received_attention(query, key, queries=queries, causal=True)
        torch.testing.assert_close(
            got.double(), naive_received(query, key, queries="all", causal=True), atol=1e-6, rtol=1e-5
        )


def test_unknown_query_choice_fails():
    query, key = random_qk()
    with pytest.raises(ValueError, match="queries must be 'all', 'last' or 'first', got 'middle'"):
        received_attention(query, key, queries="middle")


def test_head_mean_keys():
    key = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    got = head_mean_keys(key)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 4)
    torch.testing.assert_close(got, ((key[:, 0] + key[:, 1] + key[:, 2]) / 3).float())


# ---------------------------------------------------------------------------- probes on real models


@pytest.fixture(scope="module")
def llava(tiny_paths):
    return load_backbone(str(tiny_paths["llava_onevision"]), "llava_onevision")


@pytest.fixture(scope="module")
def llava_eager(tiny_paths):
    return load_backbone(str(tiny_paths["llava_onevision"]), "llava_onevision", attn_implementation="eager")


def text_inputs(backbone, pads=(3, 0), length=9, seed=0):
    """Embeddings of random tokens, a left-padding mask and matching position ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = backbone.adapter.input_embeddings(backbone.model).num_embeddings
    ids = torch.randint(0, vocab, (len(pads), length), generator=g)
    mask = left_padding(len(pads), length, pads).long()
    with torch.no_grad():
        embeds = backbone.adapter.input_embeddings(backbone.model)(ids)  # (B, L, D)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}


def layer_attention(backbone, index):
    adapter = backbone.adapter
    return adapter.self_attention(adapter.decoder_layers(backbone.model)[index])


def test_sdpa_model_is_on_sdpa(llava, llava_eager):
    assert llava.adapter.text_config(llava.model)._attn_implementation == "sdpa"
    assert llava_eager.adapter.text_config(llava_eager.model)._attn_implementation == "eager"


def test_probe_leaves_the_outputs_bit_identical(llava):
    lm = llava.adapter.language_model(llava.model)
    inputs = text_inputs(llava, pads=(3, 0))
    calls = []
    with torch.no_grad():
        plain = lm(**inputs).last_hidden_state
        with probe_attention([layer_attention(llava, 1)], lambda *args: calls.append(args)):
            probed = lm(**inputs).last_hidden_state
        again = lm(**inputs).last_hidden_state
    assert len(calls) == 1
    assert torch.equal(probed, plain)
    assert torch.equal(again, plain)


def test_timed_probes_record_each_call_and_keep_the_outputs(llava):
    """Under ``time_probes`` every probed call records the callback's and the model's attention time; the
    output is the model's where the callback returns None and the callback's where it returns one."""
    lm = llava.adapter.language_model(llava.model)
    inputs = text_inputs(llava, pads=(3, 0))
    target = layer_attention(llava, 1)
    with torch.no_grad():
        plain = lm(**inputs).last_hidden_state
        with time_probes() as timings, probe_attention([target], lambda *args: time.sleep(0.02)):
            observed = lm(**inputs).last_hidden_state
        assert torch.equal(observed, plain)
        (call,) = timings
        assert call.module == type(target).__name__ and not call.replaced
        assert call.callback_s >= 0.02 and call.base_s > 0 and call.price_s == call.callback_s

        def replace(module, query, key, value, mask, kwargs):
            return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])

        with time_probes() as timings, probe_attention([target], replace):
            replaced = lm(**inputs).last_hidden_state
        with probe_attention([target], replace):
            untimed = lm(**inputs).last_hidden_state
    assert torch.equal(replaced, untimed) and not torch.equal(replaced, plain)
    (call,) = timings
    assert call.replaced and call.price_s == call.callback_s - call.base_s
    with time_probes(), pytest.raises(RuntimeError, match="already active"), time_probes():
        pass


@pytest.mark.parametrize("pads", [(0, 0), (3, 0)])
def test_probed_queries_and_keys_give_the_eager_attention(llava, llava_eager, pads):
    lm = llava.adapter.language_model(llava.model)
    inputs = text_inputs(llava, pads=pads, length=9)
    config = llava.adapter.text_config(llava.model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    seen = []

    def record(module, query, key, value, attention_mask, kwargs):
        assert module is layer_attention(llava, 1)
        assert query.shape == (2, heads, 9, head_dim)
        assert key.shape == (2, kv_heads, 9, head_dim)
        valid = inputs["attention_mask"].bool()
        seen.append(
            received_attention(
                query,
                key,
                queries="all",
                causal=True,
                scaling=kwargs.get("scaling"),
                key_valid=valid,
                query_valid=valid,
            )
        )

    with torch.no_grad(), probe_attention([layer_attention(llava, 1)], record):
        lm(**inputs)
        eager = llava_eager.adapter.language_model(llava_eager.model)(**inputs, output_attentions=True)
    assert heads != kv_heads  # grouped-query attention is exercised
    assert len(seen) == 1
    weights = eager.attentions[1]  # (B, H, L, L)
    valid = inputs["attention_mask"].float()  # (B, L)
    want = torch.einsum("bhqk,bq->bk", weights.float(), valid) / (heads * valid.sum(-1, keepdim=True))
    torch.testing.assert_close(seen[0], want, atol=1e-5, rtol=0)
    if pads == (0, 0):
        plain = received_attention(*_probe_qk(llava, lm, inputs), queries="all", causal=True)
        torch.testing.assert_close(plain, weights.float().mean(dim=(1, 2)), atol=1e-5, rtol=0)


def _probe_qk(backbone, lm, inputs):
    got = []
    with (
        torch.no_grad(),
        probe_attention([layer_attention(backbone, 1)], lambda m, q, k, v, mask, kw: got.append((q, k))),
    ):
        lm(**inputs)
    return got[0]


def test_probe_routes_only_its_module_and_restores_the_config(llava):
    target, other = layer_attention(llava, 1), layer_attention(llava, 0)
    original = target.config
    assert other.config is original
    with probe_attention([target], lambda *args: None):
        assert target.config is not original
        assert target.config._attn_implementation == attention_module.PROBE_IMPLEMENTATION
        assert other.config is original
        assert original._attn_implementation == "sdpa"
        assert id(target) in attention_module._ACTIVE
    assert target.config is original
    assert target.config._attn_implementation == "sdpa"
    assert attention_module._ACTIVE == {}


def test_probe_restores_the_config_when_the_body_raises(llava):
    target = layer_attention(llava, 1)
    original = target.config
    lm = llava.adapter.language_model(llava.model)

    def fail(*args):
        raise KeyError("from the callback")

    with pytest.raises(RuntimeError, match="from the body"), probe_attention([target], lambda *args: None):
        raise RuntimeError("from the body")
    assert target.config is original and original._attn_implementation == "sdpa"
    assert attention_module._ACTIVE == {}
    with pytest.raises(KeyError, match="from the callback"), torch.no_grad(), probe_attention([target], fail):
        lm(**text_inputs(llava))
    assert target.config is original and original._attn_implementation == "sdpa"
    assert attention_module._ACTIVE == {}


def test_probing_a_module_twice_at_once_fails_and_restores(llava):
    target = layer_attention(llava, 1)
    original = target.config
    with probe_attention([target], lambda *args: None):
        routed = target.config
        with (
            pytest.raises(RuntimeError, match="already probed"),
            probe_attention([target], lambda *args: None),
        ):
            pass
        # the outer probe is still in place
        assert target.config is routed and id(target) in attention_module._ACTIVE
    assert target.config is original and attention_module._ACTIVE == {}
    with (
        pytest.raises(RuntimeError, match="already probed"),
        probe_attention([target, target], lambda *args: None),
    ):
        pass
    assert target.config is original and original._attn_implementation == "sdpa"
    assert attention_module._ACTIVE == {}


@pytest.mark.parametrize("family", available_families())
def test_vision_probe_signals_align_with_the_image_features(tiny_paths, images, family):
    backbone = load_backbone(str(tiny_paths[family]), family)
    model, adapter = backbone.model, backbone.adapter
    inputs = Pipeline(backbone, build_method("dense")).encode([Prompt([images[0]], "what color")])
    queries = "first" if adapter.vision_cls_token else "all"
    recorded, calls = [], []

    def record(module, query, key, value, attention_mask, kwargs):
        calls.append(module)
        attention = received_attention(query, key, queries=queries, scaling=kwargs.get("scaling"))
        recorded.append(torch.cat([attention[..., None], head_mean_keys(key)], dim=-1))  # (n, P, 1 + d)

    with torch.no_grad():
        plain = adapter.image_features(model, inputs)
        with probe_attention([adapter.vision_attention(model)], record):
            features = adapter.image_features(model, inputs)
        signals = adapter.vision_token_signals(model, inputs, recorded)
    assert calls and all(m is adapter.vision_attention(model) for m in calls)
    assert len(features) == len(plain) == len(signals) == 1
    assert torch.equal(features[0], plain[0])
    assert attention_module._ACTIVE == {}
    for feats, sig in zip(features, signals, strict=True):
        assert sig.ndim == 2 and sig.shape[0] == feats.shape[0]
        assert not sig.isnan().any()
        assert torch.all(sig[:, 0] >= 0)
        total = float(sig[:, 0].sum())
        if family in ("qwen2_vl", "qwen2_5_vl"):
            assert abs(total - 1.0) < 1e-4
        if family == "internvl":
            assert 0 < total <= 1 + 1e-6
