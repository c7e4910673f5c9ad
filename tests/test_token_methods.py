"""Contract tests of the visual-token methods on every family: budgets, batching, scoping, FastV's layer pruning."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_method_leaves_the_model_as_it_was, hook_count, model_attention_calls

from effivlm import attention
from effivlm.backbones import available_families
from effivlm.backbones.loading import load_backbone
from effivlm.layer_pruning import LayerPruning
from effivlm.methods import build_method, kept_count
from effivlm.methods.base import LayerTokenMethod
from effivlm.pipeline import Pipeline

TOKEN_METHODS = ["random", "pool", "fastv", "visionzip", "prumerge_plus"]
BUDGETS = [0.01, 0.1, 0.4, 1.0]
NEW_TOKENS = 4


def expected_kept(backbone, prompts, budget: float) -> tuple[list[list[int]], list[list[int]]]:
    """(visual tokens per image, tokens a method must keep per image) of each prompt, from the adapter's segments."""
    model, adapter = backbone.model, backbone.adapter
    pipe = Pipeline(backbone, build_method("dense"))
    inputs = pipe.encode(prompts)
    with torch.inference_mode():
        features = adapter.image_features(model, inputs)
    totals, kept, index = [], [], 0
    for p in prompts:
        totals.append([]), kept.append([])
        for _ in p.images:
            n = features[index].shape[0]
            segments = adapter.image_segments(model, inputs, index, n)
            assert sum(s.length for s in segments) == n
            totals[-1].append(n)
            kept[-1].append(sum(kept_count(budget, s.length) for s in segments))
            index += 1
    return totals, kept


@pytest.fixture(scope="module")
def dense_texts(backbones, prompts):
    return {
        family: [g.text for g in Pipeline(b, build_method("dense")).generate(prompts, NEW_TOKENS)]
        for family, b in backbones.items()
    }


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", TOKEN_METHODS)
@pytest.mark.parametrize("family", available_families())
def test_contract(backbones, prompts, dense_texts, family, method, budget):
    """Kept counts equal the budget's, per image and per layer; batch equals one by one; 1.0 equals dense."""
    backbone = backbones[family]
    built = build_method(method, budget)
    pipe = Pipeline(backbone, built)
    batch = pipe.generate(prompts, NEW_TOKENS)
    totals, kept = expected_kept(backbone, prompts, budget)
    n_layers = len(backbone.adapter.decoder_layers(backbone.model))
    for gen, total, want in zip(batch, totals, kept, strict=True):
        assert gen.stats["visual_tokens"] == total
        assert gen.stats["visual_kept"] == want
        layers = gen.stats["layer_visual"]
        assert len(layers) == len(gen.stats["layer_tokens"]) == n_layers
        if isinstance(built, LayerTokenMethod):
            assert layers == [sum(total)] * built.layer + [sum(want)] * (n_layers - built.layer)
            assert gen.stats["prefill_tokens"] == gen.stats["prompt_tokens"]
            assert gen.stats["layer_tokens"][-1] == gen.stats["prompt_tokens"] - sum(total) + sum(want)
        else:
            assert layers == [sum(want)] * n_layers
            assert gen.stats["prefill_tokens"] == gen.stats["prompt_tokens"] - sum(total) + sum(want)
    singles = [pipe.generate([p], NEW_TOKENS)[0] for p in prompts]
    assert [g.text for g in singles] == [g.text for g in batch]
    assert [g.stats["visual_kept"] for g in singles] == [g.stats["visual_kept"] for g in batch]
    if budget == 1.0:
        assert [g.text for g in batch] == dense_texts[family]


@pytest.mark.parametrize("method", ["fastv", "visionzip", "prumerge_plus"])
@pytest.mark.parametrize("family", available_families())
def test_method_leaves_the_model_as_it_was(backbones, prompts, family, method):
    assert_method_leaves_the_model_as_it_was(backbones[family], prompts, method, NEW_TOKENS)


def test_hooks_are_removed_when_a_method_fails(backbones, prompts, monkeypatch):
    backbone = backbones["llava_onevision"]
    hooks = hook_count(backbone.model)
    fastv = build_method("fastv", 0.1)

    def broken(scores, k):
        raise RuntimeError("selection failed")

    monkeypatch.setattr(type(fastv), "select", lambda self, scores, k: broken(scores, k))
    with pytest.raises(RuntimeError, match="selection failed"):
        Pipeline(backbone, fastv).generate(prompts, NEW_TOKENS)
    assert hook_count(backbone.model) == hooks
    assert not attention._ACTIVE


# --------------------------------------------------------------------------- FastV against a plain reference
def reference_forward(language_model, embeds, positions, layer, rows):
    """Decoder layers called one by one on one unpadded sample: all tokens before ``layer``, ``rows`` from it on,
    each with the rotary embedding of its original position; causal attention over the kept sequence."""
    h = embeds
    cos_sin = language_model.rotary_emb(h, positions)
    for i, decoder_layer in enumerate(language_model.layers):
        if i == layer:
            h, positions = h[:, rows], positions[..., rows]
            cos_sin = language_model.rotary_emb(h, positions)
        h = decoder_layer(h, attention_mask=None, position_embeddings=cos_sin)
    return language_model.norm(h)


@pytest.mark.parametrize("ranking", ["mean", "last"])
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_fastv_prefill_and_decode_match_a_plain_reference(backbones, prompts, family, ranking):
    backbone = backbones[family]
    model, adapter = backbone.model, backbone.adapter
    method = build_method("fastv", 0.4, {"ranking": ranking, "layer": 1})
    pipe = Pipeline(backbone, method)
    pre = pipe.prefill_inputs(pipe.encode(prompts[:1]))
    lm, lm_head, embed = (
        adapter.language_model(model),
        adapter.lm_head(model),
        adapter.input_embeddings(model),
    )
    layers = adapter.decoder_layers(model)
    impl = adapter.text_config(model)._attn_implementation
    with torch.inference_mode():
        with LayerPruning(
            layers, adapter.self_attention, method, pre.attention_mask, pre.segments, impl
        ) as p:
            tokens = pipe._decode(pre, 6, p, None)[0][0]
        rows = p.rows[0]
        # the kept visual tokens are each segment's top scores
        for seg in pre.segments[0]:
            k = kept_count(0.4, seg.slots.numel())
            top = torch.topk(p.scores[0, seg.slots], k).indices
            assert set(seg.slots[top].tolist()) == set(seg.slots.tolist()) & set(rows.tolist())
        assert rows.numel() < pre.attention_mask.shape[1]
        # greedy decoding recomputed from scratch, without a cache, gives the same tokens
        embeds, positions = pre.inputs_embeds, pre.position_ids
        want: list[int] = []
        for _ in range(len(tokens)):
            length = embeds.shape[1]
            keep = torch.cat([rows, torch.arange(pre.attention_mask.shape[1], length)])
            hidden = reference_forward(lm, embeds, positions, 1, keep)
            want.append(int(lm_head(hidden[:, -1]).argmax(-1)))
            nxt = positions[..., -1:] + 1
            embeds = torch.cat([embeds, embed(torch.tensor([[want[-1]]]))], dim=1)
            positions = torch.cat([positions, nxt], dim=-1)
        assert tokens == want


def test_fastv_prefill_hidden_states_match_the_reference(backbones, prompts):
    backbone = backbones["qwen2_5_vl"]
    model, adapter = backbone.model, backbone.adapter
    method = build_method("fastv", 0.1, {"layer": 2})
    pipe = Pipeline(backbone, method)
    pre = pipe.prefill_inputs(pipe.encode(prompts[2:]))
    lm = adapter.language_model(model)
    impl = adapter.text_config(model)._attn_implementation
    with torch.inference_mode():
        layers = adapter.decoder_layers(model)
        with LayerPruning(
            layers, adapter.self_attention, method, pre.attention_mask, pre.segments, impl
        ) as p:
            out = lm(
                inputs_embeds=pre.inputs_embeds,
                attention_mask=pre.attention_mask,
                position_ids=pre.position_ids,
            ).last_hidden_state
        ref = reference_forward(lm, pre.inputs_embeds, pre.position_ids, 2, p.rows[0])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fastv_ranking_changes_the_selection(backbones, prompts):
    backbone = backbones["internvl"]
    kept = {}
    for ranking in ("mean", "last"):
        method = build_method("fastv", 0.1, {"ranking": ranking, "layer": 1})
        pipe = Pipeline(backbone, method)
        pre = pipe.prefill_inputs(pipe.encode(prompts))
        model, adapter = backbone.model, backbone.adapter
        layers = adapter.decoder_layers(model)
        impl = adapter.text_config(model)._attn_implementation
        pruning = LayerPruning(layers, adapter.self_attention, method, pre.attention_mask, pre.segments, impl)
        with torch.inference_mode(), pruning as p:
            pipe._decode(pre, 1, p, None)
        kept[ranking] = [r.tolist() for r in p.rows]
    assert kept["mean"] != kept["last"]


# --------------------------------------------------------------------------- bad input
def test_fastv_layer_beyond_the_depth_fails_naming_the_range(backbones):
    backbone = backbones["qwen2_vl"]
    with pytest.raises(ValueError, match=r"layer 3 is outside \[1, 2\]"):
        Pipeline(backbone, build_method("fastv", 0.1, {"layer": 3}))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layer": 0}, "layer must be an integer >= 1"),
        ({"layer": 1.5}, "layer must be an integer >= 1"),
        ({"ranking": "first"}, "ranking must be one of"),
    ],
)
def test_fastv_bad_parameters_fail(params, message):
    with pytest.raises(ValueError, match=message):
        build_method("fastv", 0.1, params)


@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_eager_attention_gives_the_same_selection_and_tokens(tiny_paths, backbones, prompts, method):
    """The probes and FastV's per-layer masks also serve a model loaded with eager attention (float masks)."""
    eager = load_backbone(str(tiny_paths["qwen2_vl"]), "qwen2_vl", attn_implementation="eager")
    assert eager.adapter.text_config(eager.model)._attn_implementation == "eager"
    built = build_method(method, 0.4)
    want = Pipeline(backbones["qwen2_vl"], built).generate(prompts, NEW_TOKENS)
    got = Pipeline(eager, built).generate(prompts, NEW_TOKENS)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.stats["layer_visual"] for g in got] == [g.stats["layer_visual"] for g in want]


@pytest.mark.parametrize(
    ("method", "params", "replaced"),
    [
        ("visionzip", {}, True),
        ("prumerge_plus", {}, True),
        ("fastv", {"ranking": "mean"}, True),
        ("fastv", {"ranking": "last"}, False),
    ],
)
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_scoring_pass_replaces_the_probed_attention_when_every_row_counts(
    backbones, prompts, monkeypatch, family, method, params, replaced
):
    """A score that needs every query's row (the vision layer's mean attention, FastV's mean ranking) comes from
    one pass that also gives the probed layer its output: the model's own attention function is not called
    there. FastV's last-query ranking scores one row, so the model's function runs."""
    calls = model_attention_calls(monkeypatch)
    built = build_method(method, 0.1, params)
    Pipeline(backbones[family], built).generate(prompts[:1], 1)  # one new token: the prefill alone
    assert (not calls) == replaced, calls
