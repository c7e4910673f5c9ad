"""The config: valid configs load with defaults; every bad one fails with one line naming key and allowed values."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from effivlm.config import (
    ConfigError,
    Job,
    eval_jobs,
    format_budget,
    job_dir,
    load_config,
    method_params_of,
    model_spec,
    task_spec,
    train_spec,
)

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "synthetic": {"tasks": ["color", "count"]},
    "models": {"tiny": {"family": "qwen2_vl", "source": "embedded"}},
    "tasks": {"color": {"kind": "synthetic"}, "count": {"kind": "synthetic"}},
    "methods": {"dense": {}, "random": {"budgets": [0.01, 0.1, 0.4], "params": {"seed": 0}}},
}


REAL = {"q": {"family": "qwen2_vl", "source": "path", "path": "/weights/q"}}


def with_(**changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


def error_of(cfg: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("config: "), message
    return message


@pytest.mark.parametrize("name", ["config.yaml", "configs/test.yaml", "configs/paper.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / name)
    assert eval_jobs(cfg)


def test_defaults_are_filled() -> None:
    cfg = load_config(BASE)
    assert cfg["seed"] == 0 and cfg["results"] == "results" and cfg["device"] == "cpu"
    assert cfg["dtype"] == "float32" and cfg["attn_implementation"] == "sdpa"
    assert cfg["batch_size"] == 16 and cfg["max_new_tokens"] == 8 and cfg["limit"] is None
    assert cfg["synthetic"] == {"tasks": ["color", "count"], "image_size": 64, "n_train": 4000, "n_test": 300}
    assert cfg["models"]["tiny"]["train"] == {"steps": 3000, "batch_size": 32, "lr": 0.002, "prebuilt": True}
    assert cfg["methods"]["dense"] == {"method": "dense", "budgets": [1.0], "params": {}, "models": ["tiny"]}
    assert cfg["methods"]["random"]["method"] == "random"


def test_load_does_not_touch_its_input_and_defaults_are_not_shared() -> None:
    raw = with_(models={"a": {"family": "qwen2_vl"}, "b": {"family": "internvl"}})
    before = copy.deepcopy(raw)
    cfg = load_config(raw)
    assert raw == before
    cfg["models"]["a"]["train"]["steps"] = 1
    assert cfg["models"]["b"]["train"]["steps"] == 3000


def test_eval_jobs_is_the_full_grid() -> None:
    cfg = load_config(BASE)
    jobs = eval_jobs(cfg)
    assert len(jobs) == 1 * 2 * (1 + 3)
    assert Job("tiny", "dense", 1.0, "color") in jobs
    assert job_dir(cfg, Job("tiny", "random", 0.1, "count")) == "results/eval/tiny/random/0.1/count"


@pytest.mark.parametrize(
    ("budget", "text"),
    [(0.01, "0.01"), (0.1, "0.1"), (0.4, "0.4"), (1.0, "1.0"), (1, "1.0"), (0.125, "0.125")],
)
def test_budgets_have_one_canonical_folder_name(budget: float, text: str) -> None:
    assert format_budget(budget) == text


def test_specs_for_the_rules() -> None:
    cfg = load_config(
        with_(
            models={
                "tiny": {"family": "qwen2_vl"},
                "big": {"family": "qwen2_vl", "source": "hub", "path": "Qwen/Qwen2-VL-7B-Instruct"},
            },
        )
    )
    assert model_spec(cfg, "tiny") == {
        "name": "tiny",
        "family": "qwen2_vl",
        "path": "results/backbones/tiny",
        "revision": None,
    }
    assert model_spec(cfg, "big")["path"] == "Qwen/Qwen2-VL-7B-Instruct"
    assert model_spec(cfg, "big")["revision"] == "main"
    assert task_spec(cfg, "color") == {
        "name": "color",
        "kind": "synthetic",
        "data": "results/data/synthetic/color",
    }
    assert train_spec(cfg, "tiny") == {"steps": 3000, "batch_size": 32, "lr": 0.002, "prebuilt": True}


def test_params_do_not_depend_on_key_order() -> None:
    """Snakemake compares params by their text: reordering keys in a config file must not rerun jobs."""
    a = load_config(with_(models={"tiny": {"family": "qwen2_vl", "train": {"steps": 5, "lr": 0.1}}}))
    b = load_config(with_(models={"tiny": {"train": {"lr": 0.1, "steps": 5}, "family": "qwen2_vl"}}))
    assert repr(train_spec(a, "tiny")) == repr(train_spec(b, "tiny"))
    assert list(method_params_of(load_config(BASE), "random")) == ["seed"]


def test_real_models_with_lmms_tasks_need_no_synthetic_section() -> None:
    cfg = load_config(
        with_(
            synthetic=None,
            models={"q": {"family": "qwen2_vl", "source": "path", "path": "/weights/q"}},
            tasks={"docvqa_val": {"kind": "lmms"}},
        )
    )
    assert task_spec(cfg, "docvqa_val") == {"name": "docvqa_val", "kind": "lmms", "data": None}


def test_lmms_tasks_may_carry_their_lmms_eval_name() -> None:
    tasks = {
        "imagedc": {"kind": "lmms", "lmms_task": "dc100_en"},
        "mine": {"kind": "lmms", "include_path": "t"},
    }
    cfg = load_config(with_(synthetic=None, models=REAL, tasks=tasks))
    assert task_spec(cfg, "imagedc")["lmms_task"] == "dc100_en"
    assert task_spec(cfg, "mine")["include_path"] == "t"


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        pytest.param(
            {**BASE, "model": {}},
            "config: unknown key 'model' at top level (did you mean 'models'?) (allowed: attn_implementation,",
            id="unknown-top-level-key",
        ),
        pytest.param(
            with_(models={"tiny": {"family": "qwen2_vl", "sorce": "embedded"}}),
            "config: models.tiny: unknown key 'sorce' (did you mean 'source'?) (allowed: family, path, revision,",
            id="unknown-model-key",
        ),
        pytest.param(
            with_(methods={"dense": {}, "randm": {"budgets": [0.1]}}),
            "config: methods.randm.method: unknown method 'randm' (did you mean 'random'?); known: dense,",
            id="unknown-method",
        ),
        pytest.param(
            with_(methods={"dense": {}, "r": {"method": "fastvv", "budgets": [0.1]}}),
            "config: methods.r.method: unknown method 'fastvv'",
            id="unknown-method-explicit",
        ),
        pytest.param(
            with_(models={"tiny": {"family": "qwen2vl"}}),
            "config: models.tiny.family: unknown family 'qwen2vl' (did you mean 'qwen2_vl'?); known: ",
            id="unknown-family",
        ),
        pytest.param(
            with_(tasks={"color": {"kind": "synth"}}),
            "config: tasks.color.kind: 'synth' is not allowed (did you mean 'synthetic'?); allowed: synthetic, lmms",
            id="unknown-task-kind",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [0]}}),
            "config: methods.random.budgets[0]: 0 is outside (0, 1]",
            id="budget-0",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [0.1, 1.5]}}),
            "config: methods.random.budgets[1]: 1.5 is outside (0, 1]",
            id="budget-1.5",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": ["0.1"]}}),
            "config: methods.random.budgets[0]: expected number, got string '0.1'",
            id="budget-string",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [True]}}),
            "config: methods.random.budgets[0]: expected number, got boolean True",
            id="budget-bool",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [0.1, 0.10]}}),
            "config: methods.random.budgets[1]: 0.1 repeats budgets[0]",
            id="budget-duplicate",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {}}),
            "config: methods.random: missing required key 'budgets' for method 'random'",
            id="budgets-missing",
        ),
        pytest.param(
            with_(methods={"dense": {"budgets": [0.5]}}),
            "config: methods.dense.budgets: dense runs at budget 1.0 only",
            id="dense-budget",
        ),
        pytest.param(
            with_(methods={"random": {"budgets": [0.1]}}),
            "config: methods: exactly one variant must use method 'dense'",
            id="no-dense",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [0.1], "params": {"sed": 1}}}),
            "config: methods.random.params.sed: unknown parameter 'sed' for method 'random' (did you mean 'seed'?);"
            " allowed: seed",
            id="unknown-method-param",
        ),
        pytest.param(
            with_(methods={"dense": {}, "random": {"budgets": [0.1], "params": {"seed": "0"}}}),
            "config: methods.random.params.seed: expected int, got string '0'",
            id="method-param-type",
        ),
        pytest.param(
            with_(synthetic=None),
            "config: synthetic: section required because model 'tiny' is embedded",
            id="synthetic-missing-embedded",
        ),
        pytest.param(
            with_(synthetic=None, models={"q": {"family": "qwen2_vl", "source": "path", "path": "/w"}}),
            "config: synthetic: section required because task 'color' is synthetic",
            id="synthetic-missing-task",
        ),
        pytest.param(
            with_(tasks={"colour": {"kind": "synthetic"}}),
            "config: tasks.colour: synthetic task 'colour' is not in synthetic.tasks (did you mean 'color'?)",
            id="synthetic-task-not-in-suite",
        ),
        pytest.param(
            with_(tasks={"docvqa_val": {"kind": "lmms"}}),
            "config: tasks.docvqa_val: embedded model 'tiny' knows only the synthetic suite",
            id="embedded-on-lmms",
        ),
        pytest.param(
            with_(batch_size="16"),
            "config: batch_size: expected integer, got string '16'",
            id="wrong-type",
        ),
        pytest.param(with_(batch_size=0), "config: batch_size: must be >= 1, got 0", id="batch-size-0"),
        pytest.param(
            with_(device="gpu"),
            "config: device: 'gpu' is not allowed",
            id="unknown-device",
        ),
        pytest.param(
            with_(models={"tiny": {"family": "qwen2_vl", "source": "hub"}}),
            "config: models.tiny: missing required key 'path' for source: hub",
            id="hub-without-path",
        ),
        pytest.param(
            with_(models={"tiny": {"family": "qwen2_vl", "path": "/w"}}),
            "config: models.tiny.path: only for source: path or hub",
            id="embedded-with-path",
        ),
        pytest.param(
            with_(models={"a/b": {"family": "qwen2_vl"}}),
            "config: models: 'a/b' is not a valid name",
            id="bad-name",
        ),
        pytest.param(with_(models=None), "config: missing required key 'models'", id="models-missing"),
        pytest.param(
            with_(synthetic=None, models=REAL, tasks={"docvqa_vall": {"kind": "lmms"}}),
            "config: tasks.docvqa_vall: unknown lmms-eval task 'docvqa_vall' (did you mean 'docvqa_val'?)",
            id="unknown-lmms-task",
        ),
        pytest.param(
            with_(tasks={"color": {"kind": "synthetic", "lmms_task": "x"}}),
            "config: tasks.color.lmms_task: only for kind: lmms",
            id="lmms-task-on-synthetic",
        ),
        pytest.param([1, 2], "config: expected a mapping at top level, got array", id="not-a-mapping"),
        pytest.param(
            with_(methods={"dense": {}, "fastv": {"budgets": [0.1], "params": {"layer": 4}}}),
            "config: methods.fastv: method 'fastv': layer 4 is outside [1, 3] for a language model of 4 layers "
            "(model 'tiny')",
            id="fastv-layer-beyond-depth",
        ),
        pytest.param(
            with_(
                models={
                    "tiny": {
                        "family": "qwen2_vl",
                        "source": "embedded",
                        "train": {"sizes": {"text_layers": 2}},
                    }
                },
                methods={"dense": {}, "fastv": {"budgets": [0.1]}},
            ),
            "config: methods.fastv: method 'fastv': layer 2 is outside [1, 1] for a language model of 2 layers",
            id="fastv-default-layer-beyond-a-shallow-model",
        ),
        pytest.param(
            with_(methods={"dense": {}, "fastv": {"budgets": [0.1], "params": {"ranking": "first"}}}),
            "config: methods.fastv.params: method 'fastv': ranking must be one of ['last', 'mean'], got 'first'",
            id="fastv-bad-ranking",
        ),
        pytest.param(
            with_(
                methods={
                    "dense": {},
                    "pm": {"method": "prumerge_plus", "budgets": [0.1], "params": {"neighbours": 0}},
                }
            ),
            "config: methods.pm.params: method 'prumerge_plus': neighbours must be an integer >= 1, got 0",
            id="prumerge-neighbours-zero",
        ),
        # KV-cache methods: budget, window, pooling kind, an option the method does not have
        pytest.param(
            with_(methods={"dense": {}, "snapkv": {"budgets": [1.5]}}),
            "config: methods.snapkv.budgets[0]: 1.5 is outside (0, 1]",
            id="kv-budget-above-one",
        ),
        pytest.param(
            with_(methods={"dense": {}, "snapkv": {"budgets": [0.0]}}),
            "config: methods.snapkv.budgets[0]: 0.0 is outside (0, 1]",
            id="kv-budget-zero",
        ),
        pytest.param(
            with_(methods={"dense": {}, "h2o": {"budgets": [0.1], "params": {"window": 1.2}}}),
            "config: methods.h2o.params: method 'h2o': window 1.2 is larger than the budget",
            id="kv-window-larger-than-budget",
        ),
        pytest.param(
            with_(methods={"dense": {}, "snapkv": {"budgets": [0.1], "params": {"pooling": "mean"}}}),
            "config: methods.snapkv.params: method 'snapkv': unknown pooling kind 'mean'; allowed: avg, max",
            id="kv-unknown-pooling",
        ),
        pytest.param(
            with_(
                methods={"dense": {}, "streamingllm": {"budgets": [0.1], "params": {"head_adaptive": True}}}
            ),
            "config: methods.streamingllm.params.head_adaptive: unknown parameter 'head_adaptive' for method "
            "'streamingllm'; allowed: window",
            id="kv-option-the-method-lacks",
        ),
        pytest.param(
            with_(methods={"dense": {}, "h2o": {"budgets": [0.1], "params": {"head_adaptive": "yes"}}}),
            "config: methods.h2o.params.head_adaptive: expected bool, got string 'yes'",
            id="kv-option-wrong-type",
        ),
        pytest.param(
            with_(methods={"dense": {}, "h2o": {"budgets": [0.1], "models": ["tiny", "tinyy"]}}),
            "config: methods.h2o.models[1]: unknown model 'tinyy' (did you mean 'tiny'?); known: tiny",
            id="variant-on-unknown-model",
        ),
        pytest.param(
            with_(methods={"dense": {"models": ["tiny"]}}),
            "config: methods.dense.models: dense runs on every model",
            id="dense-restricted",
        ),
    ],
)
def test_bad_configs_fail_with_one_line(cfg: Any, expected: str) -> None:
    assert error_of(cfg).startswith(expected)


def test_allowed_values_are_listed() -> None:
    message = error_of(with_(models={"tiny": {"family": "nope"}}))
    for family in ("internvl", "llava_onevision", "qwen2_5_vl", "qwen2_vl"):
        assert family in message


def test_yaml_file_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    assert "is not valid YAML" in error_of(bad)
    assert "cannot read" in error_of(tmp_path / "missing.yaml")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_fastv_layer_is_checked_against_a_local_checkpoint_depth(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"text_config": {"num_hidden_layers": 2}}')
    local = {"q": {"family": "qwen2_vl", "source": "path", "path": str(tmp_path)}}
    fastv = {"dense": {}, "fastv": {"budgets": [0.1], "params": {"layer": 2}}}
    cfg = with_(synthetic=None, models=local, tasks={"docvqa_val": {"kind": "lmms"}}, methods=fastv)
    assert error_of(cfg) == (
        "config: methods.fastv: method 'fastv': layer 2 is outside [1, 1] for a language model of 2 layers (model 'q')"
    )
    # a checkpoint that is not there yet (still downloading, on another machine) is checked by the job itself
    cfg["models"]["q"]["path"] = str(tmp_path / "absent")
    assert load_config(cfg)["methods"]["fastv"]["params"] == {"layer": 2}


def test_a_method_that_cannot_serve_a_family_fails_before_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from effivlm.methods.tokens.fastv import FastV

    monkeypatch.setattr(FastV, "families", frozenset({"internvl", "llava_onevision"}))
    cfg = with_(methods={"dense": {}, "fastv": {"budgets": [0.1]}})
    assert error_of(cfg) == (
        "config: methods.fastv: method 'fastv' cannot serve family 'qwen2_vl'; "
        "it serves: internvl, llava_onevision (model 'tiny')"
    )


def test_a_variant_runs_only_on_its_models() -> None:
    models = {
        "a": {"family": "qwen2_vl", "source": "embedded"},
        "b": {"family": "internvl", "source": "embedded"},
    }
    methods = {"dense": {}, "h2o": {"budgets": [0.1, 0.4], "models": ["b"]}}
    cfg = load_config(with_(models=models, methods=methods))
    jobs = eval_jobs(cfg)
    assert {(j.model, j.variant) for j in jobs} == {("a", "dense"), ("b", "dense"), ("b", "h2o")}
    assert len(jobs) == (2 + 2) * 2
    assert cfg["methods"]["dense"]["models"] == ["a", "b"]
