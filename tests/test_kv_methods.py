"""Contract tests of the KV-cache methods on every family: the cache really shrinks to the budget, batching,
budget 1.0, scoping, every option, and decoding against a plain eager reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_method_leaves_the_model_as_it_was, hook_count, model_attention_calls
from transformers import DynamicCache

from effivlm import attention, kv_cache
from effivlm.backbones import available_families
from effivlm.backbones.loading import load_backbone
from effivlm.kv_cache import KVCompression
from effivlm.methods import build_method, kv_capacity
from effivlm.methods.kv.select import pool_scores, top_with_window
from effivlm.pipeline import Pipeline

#: every method, and each option's other settings (the defaults are the first variant of each method)
VARIANTS = [
    ("streamingllm", {}),
    ("random_kv", {}),
    ("h2o", {}),
    ("h2o", {"head_adaptive": False}),
    ("snapkv", {}),
    ("snapkv", {"pooling": "max", "kernel": 3}),
    ("snapkv", {"head_adaptive": False}),
    ("pyramidkv", {}),
    ("pyramidkv", {"head_adaptive": False, "beta": 4.0}),
    ("vlcache", {}),
    ("vlcache", {"layer_adaptive": False}),
    ("vlcache", {"head_adaptive": False}),
    ("lookm", {}),
    ("lookm", {"merge": "average"}),
    ("lookm", {"merge": "none"}),
]
BUDGETS = [0.01, 0.1, 0.4, 1.0]
NEW_TOKENS = 4


def variant_id(variant) -> str:
    name, params = variant
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@pytest.fixture(scope="module")
def dense_texts(backbones, prompts):
    return {
        family: [g.text for g in Pipeline(b, build_method("dense")).generate(prompts, NEW_TOKENS)]
        for family, b in backbones.items()
    }


@pytest.fixture
def cache_shapes(monkeypatch):
    """Record every layer's stored key and value shapes right after each compression."""
    shapes: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []
    original = KVCompression.compress

    def compress(self, cache):
        mask = original(self, cache)
        shapes.append([(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers])
        return mask

    monkeypatch.setattr(KVCompression, "compress", compress)
    return shapes


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("family", available_families())
def test_contract(backbones, prompts, dense_texts, cache_shapes, family, variant, budget):
    """Each layer's cache holds the budget's entries, and the bytes say so; batch equals one by one; 1.0 equals
    dense."""
    name, params = variant
    backbone = backbones[family]
    method = build_method(name, budget, params)
    pipe = Pipeline(backbone, method)
    batch = pipe.generate(prompts, NEW_TOKENS)
    n_layers = len(backbone.adapter.decoder_layers(backbone.model))
    for gen in batch:
        length = gen.stats["prompt_tokens"]
        kept = gen.stats["kv_tokens"]
        capacity = kv_capacity(budget, length)
        assert len(kept) == n_layers and all(1 <= k <= length for k in kept)
        if name in ("pyramidkv", "vlcache"):  # layer budgets move entries between layers, not the total
            window = method.window_size(capacity)
            assert sum(kept) == pytest.approx(n_layers * capacity, abs=n_layers * (n_layers - 1) / 2 + window)
        else:
            assert kept == [capacity] * n_layers
        assert gen.stats["kv_bytes"] * length == gen.stats["kv_bytes_dense"] * sum(kept) / n_layers
    singles = []
    for p in prompts:
        cache_shapes.clear()
        singles.append(pipe.generate([p], NEW_TOKENS)[0])
        if (
            budget < 1.0
        ):  # the stored tensors are cut, not masked: one sample's cache is exactly what it keeps
            for (keys, values), kept in zip(cache_shapes[0], singles[-1].stats["kv_tokens"], strict=True):
                assert keys[-2] == values[-2] == kept
        else:
            assert cache_shapes == [] or all(
                k[-2] == singles[-1].stats["prompt_tokens"] for k, _ in cache_shapes[0]
            )
    assert [g.text for g in singles] == [g.text for g in batch]
    assert [g.stats["kv_tokens"] for g in singles] == [g.stats["kv_tokens"] for g in batch]
    if budget == 1.0:
        assert [g.text for g in batch] == dense_texts[family]
        assert all(g.stats["kv_bytes"] == g.stats["kv_bytes_dense"] for g in batch)


@pytest.mark.parametrize("method", ["h2o", "vlcache", "lookm"])
@pytest.mark.parametrize("family", available_families())
def test_method_leaves_the_model_as_it_was(backbones, prompts, family, method):
    assert_method_leaves_the_model_as_it_was(backbones[family], prompts, method, NEW_TOKENS)


def test_hooks_are_removed_when_a_method_fails(backbones, prompts, monkeypatch):
    backbone = backbones["qwen2_vl"]
    Pipeline(backbone, build_method("dense")).generate(prompts[:1], 1)
    hooks = hook_count(backbone.model)

    def broken(self, ctx):
        raise RuntimeError("selection failed")

    method = build_method("h2o", 0.1)
    monkeypatch.setattr(type(method), "select", broken)
    with pytest.raises(RuntimeError, match="selection failed"):
        Pipeline(backbone, method).generate(prompts[:1], NEW_TOKENS)
    assert hook_count(backbone.model) == hooks
    assert not attention._ACTIVE


# ---------------------------------------------------------------------------- options, end to end

OPTIONS = [
    ("h2o", {"head_adaptive": True}, {"head_adaptive": False}),
    ("snapkv", {"head_adaptive": True}, {"head_adaptive": False}),
    ("snapkv", {"pooling": "avg"}, {"pooling": "max"}),
    ("snapkv", {"kernel": 5}, {"kernel": 1}),
    ("pyramidkv", {"beta": 20.0}, {"beta": 2.0}),
    ("pyramidkv", {"head_adaptive": True}, {"head_adaptive": False}),
    ("vlcache", {"head_adaptive": True}, {"head_adaptive": False}),
    ("lookm", {"merge": "pivotal"}, {"merge": "none"}),
    ("lookm", {"merge": "average"}, {"merge": "pivotal"}),
    ("streamingllm", {"window": 0.1}, {"window": 0.5}),
]


def compressed_cache(backbone, prompts, name, params, budget=0.4):
    """Every layer's keys right after compression, for one generate call."""
    captured = []
    original = KVCompression.compress

    def compress(self, cache):
        mask = original(self, cache)
        captured.extend(layer.keys.clone() for layer in cache.layers)
        return mask

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVCompression, "compress", compress)
        Pipeline(backbone, build_method(name, budget, params)).generate(prompts, 1)
    return captured


@pytest.fixture(scope="module")
def sharp_backbone(tiny_paths):
    """A random-init backbone whose decoder attention is peaked, as a trained model's is: with near-uniform
    attention, the entries' accumulated attention falls with position in every head alike, and per-head
    rankings could not differ from the shared one."""
    backbone = load_backbone(str(tiny_paths["llava_onevision"]), "llava_onevision")
    with torch.no_grad():
        for layer in backbone.adapter.decoder_layers(backbone.model):
            attn = backbone.adapter.self_attention(layer)
            attn.q_proj.weight.mul_(4.0)
            attn.k_proj.weight.mul_(4.0)
    return backbone


@pytest.mark.parametrize(("method", "on", "off"), OPTIONS, ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_changes_what_the_cache_keeps(sharp_backbone, prompts, method, on, off):
    """An option that were silently ignored (as in the reference code) would leave the cache unchanged."""
    a = compressed_cache(sharp_backbone, prompts[:2], method, on)
    b = compressed_cache(sharp_backbone, prompts[:2], method, off)
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_layer_adaptive_budgets_follow_the_measured_sparsity(backbones, prompts, monkeypatch):
    backbone = backbones["qwen2_vl"]
    seen = {}
    original = KVCompression.compress

    def compress(self, cache):
        seen["sparsity"] = [float(s[0]) for s in self.sparsity]
        return original(self, cache)

    monkeypatch.setattr(KVCompression, "compress", compress)
    gen = Pipeline(backbone, build_method("vlcache", 0.4)).generate(prompts[:1], 1)[0]
    method = build_method("vlcache", 0.4)
    assert all(0.0 <= s < 1.0 for s in seen["sparsity"])
    assert gen.stats["kv_tokens"] == method.layer_capacities(gen.stats["prompt_tokens"], 3, seen["sparsity"])
    uniform = Pipeline(backbone, build_method("vlcache", 0.4, {"layer_adaptive": False})).generate(
        prompts[:1], 1
    )
    assert sum(uniform[0].stats["kv_tokens"]) == sum(gen.stats["kv_tokens"])


# ---------------------------------------------------------------------------- against a plain reference


def eager_reference(backbone, prompt, method, steps):
    """Greedy tokens of a plain loop: eager attention with output_attentions gives the full attention matrices,
    the method's scores are summed from them, each layer's DynamicCache is cut by hand, and decoding runs on
    the cut cache with the uncompressed prompt's positions. Batch of one, no padding."""
    model, adapter = backbone.model, backbone.adapter
    pipe = Pipeline(backbone, build_method("dense"))
    pre = pipe.prefill_inputs(pipe.encode([prompt]))
    lm, head, embed = adapter.language_model(model), adapter.lm_head(model), adapter.input_embeddings(model)
    name, budget = method.name, method.budget
    is_image = pre.image_mask()[0]
    length = is_image.shape[0]
    cache = DynamicCache(config=adapter.text_config(model))
    config = adapter.text_config(model)
    saved = config._attn_implementation
    config._attn_implementation = "eager"  # only for this reference's own forward
    try:
        out = lm(
            inputs_embeds=pre.inputs_embeds,
            attention_mask=pre.attention_mask,
            position_ids=pre.position_ids,
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
        )
    finally:
        config._attn_implementation = saved
    capacity = kv_capacity(budget, length)
    window = method.window_size(capacity)
    rows = method.query_mask(is_image)
    for layer, probs in zip(cache.layers, out.attentions, strict=True):
        # probs (1, H, L, L): the method's rows, summed; each KV head sums its group of query heads
        summed = probs[0, :, rows].sum(dim=1).double()  # (H, L)
        kv_heads = layer.keys.shape[1]
        scores = summed.view(kv_heads, -1, length).sum(dim=1)
        if name == "snapkv":
            cut = length - window
            scores = torch.cat([pool_scores(scores[:, :cut], "avg", 5), scores[:, cut:]], dim=-1)
        if name == "lookm":  # text before images
            scores = scores + (~is_image).double()[None] * (scores.max() + 1)
        kept = top_with_window(scores, capacity, window)
        index = kept[None, ..., None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    pos = pre.position_ids if pre.position_ids.ndim == 3 else pre.position_ids[None]
    next_pos = int(pos.amax()) + 1
    tokens, logits = [], []
    for step in range(steps):
        logit = head(out.last_hidden_state[:, -1])
        logits.append(logit)
        tokens.append(int(logit.argmax(-1)))
        position = torch.tensor([[next_pos + step]])
        if pre.position_ids.ndim == 3:
            position = position[None].expand(pre.position_ids.shape[0], -1, -1)
        out = lm(
            inputs_embeds=embed(torch.tensor([[tokens[-1]]])),
            attention_mask=torch.ones(1, capacity + step + 1, dtype=torch.long),
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
    return tokens, torch.cat(logits)


@pytest.mark.parametrize(
    ("name", "chunk"),
    [("h2o", 256), ("h2o", 8), ("lookm", 8), ("snapkv", 256), ("vlcache", 256), ("vlcache", 8)],
)
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "sharp"])
@torch.inference_mode()
def test_scores_selection_and_decoding_match_an_eager_reference(
    request, backbones, prompts, monkeypatch, family, name, chunk
):
    """Chunk 8 cuts the scored rows into several chunks, the last one partly."""
    monkeypatch.setattr(kv_cache, "SCORE_CHUNK", chunk)
    backbone = request.getfixturevalue("sharp_backbone") if family == "sharp" else backbones[family]
    steps = 5
    params = {"layer_adaptive": False} if name == "vlcache" else {"merge": "none"} if name == "lookm" else {}
    method = build_method(name, 0.4, params)
    pipe = Pipeline(backbone, method)
    captured = []
    original_head = backbone.adapter.lm_head(backbone.model).forward

    def head(hidden):
        out = original_head(hidden)
        captured.append(out)
        return out

    model_head = backbone.adapter.lm_head(backbone.model)
    model_head.forward = head
    try:
        gen = pipe.generate([prompts[1]], steps)[0]
    finally:
        del model_head.forward
    want_tokens, want_logits = eager_reference(backbone, prompts[1], method, steps)
    got = backbone.processor.tokenizer.decode(
        want_tokens[: gen.stats["new_tokens"]], skip_special_tokens=True
    )
    assert gen.text == got.strip()
    n = gen.stats["new_tokens"]
    torch.testing.assert_close(torch.cat(captured)[:n], want_logits[:n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["h2o", "pyramidkv", "vlcache"])
def test_eager_attention_gives_the_same_cache_and_tokens(tiny_paths, backbones, prompts, name):
    """The probes and the decode masks work the same under eager attention (an additive float mask)."""
    eager = load_backbone(str(tiny_paths["qwen2_vl"]), "qwen2_vl", attn_implementation="eager")
    want = Pipeline(backbones["qwen2_vl"], build_method(name, 0.4)).generate(prompts, NEW_TOKENS)
    got = Pipeline(eager, build_method(name, 0.4)).generate(prompts, NEW_TOKENS)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.stats["kv_tokens"] for g in got] == [g.stats["kv_tokens"] for g in want]


@pytest.mark.parametrize(
    ("name", "replaced"),
    [("h2o", True), ("lookm", True), ("vlcache", True), ("snapkv", False), ("pyramidkv", False)],
)
def test_scoring_pass_replaces_the_layers_attention_when_it_covers_most_rows(
    backbones, prompts, monkeypatch, name, replaced
):
    """H2O and LOOK-M score every prompt row and VL-Cache the rows after the image, most of the attention work:
    their pass returns the layer's output and the model's own attention function is not called in the prefill.
    SnapKV and PyramidKV score a window of rows: the model's function runs and the pass scores the window."""
    backbone = backbones["qwen2_vl"]
    calls = model_attention_calls(monkeypatch)
    Pipeline(backbone, build_method(name, 0.1)).generate(prompts[:1], NEW_TOKENS)
    n_layers = len(backbone.adapter.decoder_layers(backbone.model))
    prefill_calls = [rows for _, rows in calls if rows > 1]  # decode steps have one query row
    assert len(prefill_calls) == (0 if replaced else n_layers)


def test_time_compression_times_each_compression_and_changes_nothing(backbones, prompts):
    """Every compress call is timed while the context is active, none after; the outputs are the untimed ones."""
    pipe = Pipeline(backbones["qwen2_vl"], build_method("lookm", 0.4))
    plain = pipe.generate(prompts, NEW_TOKENS)
    with kv_cache.time_compression() as times:
        timed = pipe.generate(prompts, NEW_TOKENS)
        pipe.generate(prompts[:1], NEW_TOKENS)
        with pytest.raises(RuntimeError, match="already active"), kv_cache.time_compression():
            pass
    assert len(times) == 2 and all(t > 0 for t in times)
    assert [g.text for g in timed] == [g.text for g in plain]
    assert [g.stats for g in timed] == [g.stats for g in plain]
    pipe.generate(prompts[:1], NEW_TOKENS)
    assert len(times) == 2
