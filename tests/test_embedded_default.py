"""The committed small backbones are exactly what the DAG's training rule makes from config.yaml, and they work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from effivlm.backbones.train import META_FILE, TrainSpec, fingerprint
from effivlm.data import synthetic
from effivlm.methods import build_method
from effivlm.metrics.loyalty import normalise_prediction
from effivlm.pipeline import Pipeline, Prompt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
EMBEDDED = {name: m for name, m in CONFIG["models"].items() if m.get("source") == "embedded"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    syn = CONFIG["synthetic"]
    out = tmp_path_factory.mktemp("suite")
    synthetic.write_suite(out, syn["tasks"], syn["n_train"], syn["n_test"], syn["image_size"], CONFIG["seed"])
    return out


def test_every_family_has_an_embedded_backbone():
    assert sorted(m["family"] for m in EMBEDDED.values()) == [
        "internvl",
        "llava_onevision",
        "qwen2_5_vl",
        "qwen2_vl",
    ]


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_prebuilt_matches_the_rule_fingerprint(name, suite):
    """The rule reuses the prebuilt copy only when training it from config.yaml would produce it."""
    model = EMBEDDED[name]
    meta = json.loads((ROOT / "assets" / "backbones" / name / META_FILE).read_text())
    manifest = json.loads((suite / "manifest.json").read_text())
    expected = fingerprint(
        model["family"], TrainSpec.from_dict(model.get("train", {})), CONFIG["seed"], manifest
    )
    assert meta["fingerprint"] == expected
    assert meta["family"] == model["family"]


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_prebuilt_is_at_least_95_percent_accurate_on_every_task(name):
    meta = json.loads((ROOT / "assets" / "backbones" / name / META_FILE).read_text())
    accuracy = meta["held_out_accuracy"]
    assert set(accuracy) == set(CONFIG["synthetic"]["tasks"])
    assert all(a >= 0.95 for a in accuracy.values()), accuracy


def _accuracy(pipe: Pipeline, records: list[dict]) -> float:
    prompts = [Prompt([synthetic.decode_image(r["image"])], r["question"]) for r in records]
    answers = pipe.generate(prompts, max_new_tokens=6)
    return sum(
        normalise_prediction(g.text) == r["answer"] for g, r in zip(answers, records, strict=True)
    ) / len(records)


def test_dropping_visual_tokens_hurts_the_tasks_that_need_the_image(suite):
    name = next(n for n, m in EMBEDDED.items() if m["family"] == "qwen2_vl")
    dense = Pipeline.from_spec(str(ROOT / "assets" / "backbones" / name), "qwen2_vl", "dense")
    pruned = Pipeline(dense.backbone, build_method("random", 0.01))  # same weights, no second load
    for task in ("color", "count"):
        records = synthetic.read_split(suite / task / "test.jsonl")[:64]
        full, kept = _accuracy(dense, records), _accuracy(pruned, records)
        assert full >= 0.9, (task, full)
        assert kept <= full - 0.3, (task, full, kept)
