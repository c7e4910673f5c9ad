"""Adapters, loading and the generation engine on small random-init backbones of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_SIZES

from effivlm.backbones import available_families, get_adapter
from effivlm.backbones.loading import load_backbone
from effivlm.backbones.processor import load_processor
from effivlm.methods import build_method
from effivlm.pipeline import Pipeline, Prompt
from effivlm.registry import UnknownNameError

FAMILIES = ["internvl", "llava_onevision", "qwen2_5_vl", "qwen2_vl"]
QUESTIONS = ["what color is the shape at the top left?", "how many shapes are there?"]


def test_every_family_is_registered():
    assert available_families() == FAMILIES


def test_unknown_family_suggests_the_closest():
    with pytest.raises(UnknownNameError, match=r"unknown family 'qwen2vl' \(did you mean 'qwen2_vl'\?\)"):
        get_adapter("qwen2vl")


def test_missing_weights_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="model path '.*nowhere' does not exist"):
        load_backbone(str(tmp_path / "nowhere"), "qwen2_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request, tiny_paths):
    return load_backbone(str(tiny_paths[request.param]), request.param)


def _prompts(images, n=2):
    return [Prompt([images[i]], QUESTIONS[i % 2]) for i in range(n)]


def test_loading_uses_native_classes_and_sdpa(backbone):
    adapter, model = backbone.adapter, backbone.model
    assert type(model) is adapter.model_class
    assert adapter.text_config(model)._attn_implementation == "sdpa"
    assert len(adapter.decoder_layers(model)) == TEST_SIZES.text_layers
    assert isinstance(adapter.vision_tower(model), torch.nn.Module)
    assert isinstance(adapter.projector(model), torch.nn.Module)
    assert backbone.processor.tokenizer.convert_ids_to_tokens(adapter.image_token_id(model)) in (
        "<image>",
        "<|image_pad|>",
        "<IMG_CONTEXT>",
    )


def test_processor_loads_without_torchvision(backbone):
    adapter = backbone.adapter
    processor = load_processor(backbone.path, adapter.processor_class, adapter.image_processor_class)
    assert isinstance(processor, adapter.processor_class)


def test_engine_prefill_matches_native_forward(backbone, images):
    """The engine's own composition (embed, scatter, positions, LM) equals the model's forward."""
    pipe = Pipeline(backbone, build_method("dense"))
    inputs = pipe.encode(_prompts(images))
    native_inputs = backbone.adapter.forward_inputs(inputs)
    with torch.inference_mode():
        native = backbone.model(**native_inputs).logits[:, -1]
        pre = pipe.prefill_inputs(inputs)
        hidden = backbone.adapter.language_model(backbone.model)(
            inputs_embeds=pre.inputs_embeds, attention_mask=pre.attention_mask, position_ids=pre.position_ids
        ).last_hidden_state
        mine = backbone.adapter.lm_head(backbone.model)(hidden[:, -1])
    torch.testing.assert_close(mine, native, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_matches_transformers_generate(backbone, images):
    """Decode positions (incl. Qwen2-VL's rope deltas) agree with transformers' own generate()."""
    pipe = Pipeline(backbone, build_method("dense"))
    prompts = _prompts(images, 1)
    inputs = pipe.encode(prompts)
    native_inputs = backbone.adapter.forward_inputs(inputs)
    eos = backbone.processor.tokenizer.eos_token_id
    with torch.inference_mode():
        ref = backbone.model.generate(**native_inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    ref_tokens = ref[0, inputs["input_ids"].shape[1] :].tolist()
    if eos in ref_tokens:
        ref_tokens = ref_tokens[: ref_tokens.index(eos)]
    ref_text = backbone.processor.tokenizer.decode(ref_tokens, skip_special_tokens=True).strip()
    assert pipe.generate(prompts, max_new_tokens=6)[0].text == ref_text


def test_qwen_positions_are_three_dimensional(tiny_paths, images):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        pipe = Pipeline(load_backbone(str(tiny_paths[family]), family), build_method("dense"))
        inputs = pipe.encode(_prompts(images))
        positions = pipe.prefill_inputs(inputs).position_ids
        assert positions.shape[:2] == (3, 2)
        # visual tokens carry 2-D grid positions: height and width axes differ inside the image
        assert not torch.equal(positions[1], positions[2])


def test_random_at_full_budget_reproduces_dense(backbone, images):
    prompts = _prompts(images, 4)
    dense = Pipeline(backbone, build_method("dense")).generate(prompts, max_new_tokens=5)
    full = Pipeline(backbone, build_method("random", 1.0)).generate(prompts, max_new_tokens=5)
    assert [g.text for g in full] == [g.text for g in dense]


@pytest.mark.parametrize("budget", [0.01, 0.1, 0.4])
def test_random_keeps_the_budget_in_every_segment(backbone, images, budget):
    from effivlm.methods import kept_count

    pipe = Pipeline(backbone, build_method("random", budget))
    inputs = pipe.encode(_prompts(images))
    pre = pipe.prefill_inputs(inputs)
    model = backbone.model
    for b, stats in enumerate(pre.stats):
        (n_tokens,) = stats["visual_tokens"]
        segments = backbone.adapter.image_segments(model, inputs, b, n_tokens)
        assert stats["visual_kept"] == [sum(kept_count(budget, s.length) for s in segments)]
        dropped = n_tokens - stats["visual_kept"][0]
        assert stats["prefill_tokens"] == stats["prompt_tokens"] - dropped


def test_batch_size_does_not_change_predictions(backbone, images):
    prompts = _prompts(images, 3)
    pipe = Pipeline(backbone, build_method("random", 0.4))
    batched = [g.text for g in pipe.generate(prompts, max_new_tokens=5)]
    single = [pipe.generate([p], max_new_tokens=5)[0].text for p in prompts]
    assert batched == single


def test_multi_image_prompts(backbone, images):
    pipe = Pipeline(backbone, build_method("random", 0.4))
    (gen,) = pipe.generate([Prompt([images[0], images[1]], QUESTIONS[0])], max_new_tokens=3)
    assert len(gen.stats["visual_tokens"]) == 2
    assert all(k < n for k, n in zip(gen.stats["visual_kept"], gen.stats["visual_tokens"], strict=True))


def test_every_family_module_registers_its_adapter():
    from effivlm.backbones import FAMILY_MODULES
    from effivlm.backbones.base import ADAPTERS

    for family in FAMILY_MODULES:
        assert get_adapter(family).family == family
    assert ADAPTERS.names() == available_families()
