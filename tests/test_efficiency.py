"""The efficiency rule's measurement: records, analytic FLOPs against the model's shapes, random backbones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effivlm.backbones.sizes import TinySizes
from effivlm.efficiency.flops import DecoderShape, layer_flops, prefill_flops, tokens_per_layer_for
from effivlm.efficiency.job import run_efficiency
from effivlm.efficiency.profile import (
    PeakMemory,
    Settings,
    analytic_flops,
    apply_weights_to_random,
    profile,
    random_backbone,
    summary,
    synthetic_prompts,
)
from effivlm.methods import build_method, kept_count
from effivlm.methods.weights.qlinear import QuantLinear
from effivlm.pipeline import Pipeline

FAST = {"repeats": 2, "warmup": 0, "new_tokens": 4, "question_tokens": 8, "image_size": 64}
SMALL = TinySizes(64, 3, 4, 2, 128, 32, 1, 2, 64, 1024)


def record(tmp_path: Path, tiny_paths, method: str, budget: float, **params) -> dict:
    out = tmp_path / f"{method}-{budget}.json"
    run_efficiency(
        out,
        model={"name": "m", "family": "qwen2_vl", "path": str(tiny_paths["qwen2_vl"])},
        method=method,
        method_name=method,
        method_params=params,
        budget=budget,
        weights=None,
        settings=FAST,
        log_file=tmp_path / "log.txt",
    )
    return json.loads(out.read_text())


def test_record_has_every_figure_and_dense_flops_match_the_weights(tmp_path: Path, tiny_paths) -> None:
    rec = record(tmp_path, tiny_paths, "dense", 1.0)
    for key in ("ttft_ms", "decode_ms", "tokens_per_s", "peak_memory_bytes", "kv_bytes", "prefill_flops"):
        assert rec[key] > 0, key
    assert len(rec["ttft_runs_ms"]) == len(rec["decode_runs_ms"]) == 2
    assert rec["ttft"]["min"] <= rec["ttft"]["median"] <= rec["ttft"]["max"]
    assert rec["tokens_per_s"] == pytest.approx(1e3 / rec["decode_ms"])
    assert rec["kv_bytes"] == rec["kv_bytes_dense"] and rec["kv_share"] == 1.0
    assert rec["peak_memory_kind"] in ("peak_rss", "peak_rss_since_start")
    # dense prefill from the weights themselves: 2 FLOPs per weight per token in every decoder layer's linears,
    # the causal attention pairs, and the LM head for the one position whose logits generation needs
    from effivlm.backbones.loading import load_backbone

    backbone = load_backbone(str(tiny_paths["qwen2_vl"]), "qwen2_vl")
    layers = backbone.adapter.decoder_layers(backbone.model)
    n = rec["prompt_tokens"]
    cfg = backbone.adapter.text_config(backbone.model)
    expected = 0.0
    for layer in layers:
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        q_width = layer.self_attn.q_proj.out_features  # heads x head_dim
        expected += 2 * weights * n + 4 * (n * (n + 1) // 2) * q_width
    expected += 2 * cfg.hidden_size * cfg.vocab_size
    assert rec["prefill_flops"] == pytest.approx(expected)
    assert rec["layer_tokens"] == [n] * len(layers)
    log = (tmp_path / "log.txt").read_text()
    assert "TTFT" in log and "finished" in log


def test_fastv_keeping_ten_percent_after_layer_k_reduces_flops_as_counted(tmp_path: Path, tiny_paths) -> None:
    dense = record(tmp_path, tiny_paths, "dense", 1.0)
    fastv = record(tmp_path, tiny_paths, "fastv", 0.1, layer=2)
    n_visual = dense["visual_tokens"]
    assert fastv["visual_kept"] == kept_count(0.1, n_visual) < n_visual
    shape = DecoderShape(64, 128, 3, 4, 2, 16, 1)  # vocabulary only enters the LM head, counted apart
    text = dense["prompt_tokens"] - n_visual
    per_layer = tokens_per_layer_for(text, n_visual, 0.1, 2, 3)
    assert fastv["layer_tokens"] == per_layer
    saved = sum(
        layer_flops(shape, a, a, causal=True) - layer_flops(shape, b, b, causal=True)
        for a, b in zip(dense["layer_tokens"], per_layer, strict=True)
    )
    assert dense["prefill_flops"] - fastv["prefill_flops"] == pytest.approx(saved)
    # decoding attends to the shorter cache in the pruned layer
    assert fastv["decode_flops"] < dense["decode_flops"]


def test_kv_method_keeps_its_share_of_the_cache(tmp_path: Path, tiny_paths) -> None:
    rec = record(tmp_path, tiny_paths, "snapkv", 0.4)
    assert rec["kv_share"] == pytest.approx(sum(rec["kv_tokens"]) / (3 * rec["prompt_tokens"]))
    assert rec["kv_share"] < 0.5


def test_random_backbone_takes_a_weights_entry_by_its_own_structure() -> None:
    settings = Settings(backbone="random", **FAST)
    args = {"image_size": 64, "dtype": "float32", "device": "cpu", "attn": "sdpa", "seed": 0}
    backbone = random_backbone("qwen2_vl", SMALL, **args)
    prompts = synthetic_prompts(backbone, settings, 0)
    done = apply_weights_to_random(
        backbone, {"name": "c", "method": "cfsp", "params": {"sparsity": 0.5}}, prompts, 0
    )
    assert done["stand_in_for"] is None
    widths = [layer.mlp.down_proj.in_features for layer in backbone.adapter.decoder_layers(backbone.model)]
    assert sum(widths) == pytest.approx(0.5 * 3 * 128, abs=3)
    shape = DecoderShape.from_model(
        backbone.adapter.text_config(backbone.model), backbone.adapter.decoder_layers(backbone.model)
    )
    assert shape.intermediates == tuple(widths)
    flops = analytic_flops(backbone, {"layer_tokens": [10] * 3, "kv_tokens": [10] * 3})
    assert (
        flops["prefill_flops"]
        == prefill_flops(shape, [10] * 3)
        < prefill_flops(DecoderShape.from_config(backbone.adapter.text_config(backbone.model)), [10] * 3)
    )

    quant = random_backbone("qwen2_vl", SMALL, **args)
    done = apply_weights_to_random(
        quant, {"name": "g", "method": "gptq", "params": {"bits": 4, "group_size": 32}}, prompts, 0
    )
    assert done["stand_in_for"] == "gptq" and done["method"]["name"] == "rtn"
    assert any(isinstance(m, QuantLinear) for m in quant.model.modules())
    out = profile(Pipeline(quant, build_method("dense")), prompts, settings)
    assert out["decode_ms"] > 0


def test_summary_and_peak_memory() -> None:
    assert summary([4.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "max": 4.0}
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched inside the block
        block += 1
    assert peak.bytes is not None and peak.bytes >= 64 * 2**20


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backbone": "remote"}, "efficiency.backbone"),
        ({"sizes": "13b"}, "efficiency.sizes"),
        ({"new_tokens": 2}, "efficiency.new_tokens"),
        ({"repeats": 0}, "efficiency.repeats"),
    ],
)
def test_bad_settings_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**settings)
