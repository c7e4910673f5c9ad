"""Plain helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import torch
import yaml

from effivlm import attention
from effivlm.methods import build_method
from effivlm.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT


# ---------------------------------------------------------------------------- the workflow
DRY = ("--dry-run", "--cores", "2")


def command(workdir: Path, *args: str) -> list[str]:
    """The repository's workflow, run with its own working directory (its .snakemake/ stays out of the repo)."""
    snakefile = str(REPO / "Snakefile")
    return [sys.executable, "-m", "snakemake", "--snakefile", snakefile, "--directory", str(workdir), *args]


def snakemake(
    workdir: Path, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake; ``env`` adds to (never replaces) this process's environment."""
    return subprocess.run(
        command(workdir, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    table = stdout.split("Job stats:", 1)[1]
    return {m["rule"]: int(m["count"]) for m in re.finditer(r"^(?P<rule>\w+)\s+(?P<count>\d+)$", table, re.M)}


@dataclass(frozen=True)
class TestRun:
    """A finished local run of configs/test.yaml: its Snakemake working directory (with .snakemake/), its
    results folder and the completed process. Shared by the whole session: copy it before changing it."""

    __test__ = False  # not a test class

    workdir: Path
    results: Path
    result: subprocess.CompletedProcess[str]

    def config_args(self) -> tuple[str, ...]:
        return ("--configfile", str(REPO / "configs/test.yaml"), "--config", f"results={self.results}")


# ------------------------------------------------- slices of the test config, and comparing two runs of them
# (tests/test_determinism.py, tests/test_faults.py, tests/test_bad_input.py)

#: fields that measure time (or depend on a measured time), never compared
TIMING = re.compile(r"seconds|_ms$|ttft|decode_(?:ms|q|speedup)|speedup|tokens_per_s|peak_memory")


def derived_config(models: list[str], tasks: list[str], methods: list[str]) -> dict[str, Any]:
    """configs/test.yaml cut down to some models, tasks and method variants, without efficiency jobs (they
    measure time). Every job it keeps has exactly the params of the same job of the full config."""
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    cfg["models"] = {name: cfg["models"][name] for name in models}
    cfg["tasks"] = {name: cfg["tasks"][name] for name in tasks}
    cfg["methods"] = {name: cfg["methods"][name] for name in methods}
    used = {spec.get("weights") for spec in cfg["methods"].values()} - {None}
    cfg["weights"] = {name: spec for name, spec in cfg["weights"].items() if name in used}
    cfg["efficiency"] = {"models": []}
    return cfg


def run_derived(workdir: Path, cfg: dict[str, Any], *args: str) -> tuple[Path, list[str]]:
    """Write ``cfg`` beside ``workdir`` and return (its results folder, the arguments of a Snakemake run of
    its tables)."""
    results = workdir / "results"
    cfg = {**copy.deepcopy(cfg), "results": str(results)}
    cfg_file = workdir.parent / f"{workdir.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    # the target first: --configfile takes every argument after it
    return results, [f"{results}/tables/metrics.csv", *args, "--configfile", str(cfg_file)]


def _masked(value: Any, results: Path) -> Any:
    """A JSON value with timing fields dropped and the results folder's path replaced by '<results>'."""
    if isinstance(value, dict):
        return {k: _masked(v, results) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_masked(v, results) for v in value]
    if isinstance(value, str):
        return value.replace(str(results), "<results>")
    return value


def masked_json(path: Path, results: Path) -> Any:
    return _masked(json.loads(path.read_text()), results)


def metrics_rows(results: Path, jobs: list[str]) -> pd.DataFrame:
    """The rows of tables/metrics.csv of ``jobs`` (``model/variant/budget/task``), timing columns dropped and
    paths made relative to the results folder."""
    table = pd.read_csv(results / "tables" / "metrics.csv", dtype=str, keep_default_na=False)  # cells as text
    table = table.drop(columns=[c for c in table.columns if TIMING.search(c)])
    table["job_dir"] = table["job_dir"].str.replace(str(results), "<results>", regex=False)
    keys = table["job_dir"].str.removeprefix("<results>/eval/")
    return table[keys.isin(jobs)].sort_values("job_dir").reset_index(drop=True)


def assert_same_results(first: Path, second: Path) -> list[str]:
    """Every job folder, backbone and checkpoint of ``second`` holds what the same one of ``first`` holds;
    returns the jobs compared (``model/variant/budget/task``)."""
    jobs = sorted(
        str(p.parent.relative_to(second / "eval")) for p in second.glob("eval/*/*/*/*/metrics.json")
    )
    assert jobs, f"no finished jobs in {second}"
    for job in jobs:
        a, b = first / "eval" / job, second / "eval" / job
        assert (a / "predictions.jsonl").read_bytes() == (b / "predictions.jsonl").read_bytes(), job
        assert masked_json(a / "metrics.json", first) == masked_json(b / "metrics.json", second), job
    folders = [p.relative_to(second) for p in (*second.glob("backbones/*"), *second.glob("compressed/*/*"))]
    assert folders, f"no backbones or checkpoints in {second}"
    for folder in folders:
        files = sorted(p.name for p in (second / folder).iterdir())
        assert files == sorted(p.name for p in (first / folder).iterdir()), folder
        for name in files:
            a, b = first / folder / name, second / folder / name
            if name.startswith("effivlm_"):  # what the folder holds and how it was made: timings, paths
                assert masked_json(a, first) == masked_json(b, second), b
            else:
                assert a.read_bytes() == b.read_bytes(), b
    pd.testing.assert_frame_equal(metrics_rows(first, jobs), metrics_rows(second, jobs))
    return jobs


# ---------------------------------------------------------------------------- benchmarks
def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py``, imported as the module ``<name>_bench``."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, title: str) -> list[list[str]]:
    """Body rows of the Markdown table that follows the heading ``title``."""
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


# ---------------------------------------------------------------------------- methods
def hook_count(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks registered on all of ``model``'s modules."""
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


def assert_method_leaves_the_model_as_it_was(backbone, prompts, method: str, new_tokens: int) -> None:
    """Generating with ``method`` at budget 0.1 leaves the model's logits, parameters, configs and hooks as they
    were, and no attention probe active."""
    model = backbone.model
    params = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {id(m): m.config for m in model.modules() if hasattr(m, "config")}
    inputs = Pipeline(backbone, build_method("dense")).encode(prompts)
    with torch.inference_mode():
        before = model(**backbone.adapter.forward_inputs(inputs)).logits
        hooks = hook_count(model)  # after a first forward: transformers installs its own hooks lazily
        Pipeline(backbone, build_method(method, 0.1)).generate(prompts, new_tokens)
        after = model(**backbone.adapter.forward_inputs(inputs)).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {id(m): m.config for m in model.modules() if hasattr(m, "config")} == configs
    assert hook_count(model) == hooks
    assert not attention._ACTIVE


def model_attention_calls(monkeypatch) -> list[tuple[str, int]]:
    """While the test runs, every call a probe passes on to the model's own attention function appends (the
    attention module's class name, the call's query rows) to the returned list; calls whose output the scoring
    pass computed itself never reach it."""
    calls: list[tuple[str, int]] = []
    original = attention._base_function

    def counting(module, implementation):
        function = original(module, implementation)

        def call(module, query, *args, **kwargs):
            calls.append((type(module).__name__, query.shape[2]))
            return function(module, query, *args, **kwargs)

        return call

    monkeypatch.setattr(attention, "_base_function", counting)
    return calls
