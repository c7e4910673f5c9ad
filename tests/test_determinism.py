"""Determinism: two runs of the same jobs give the same predictions, weights and tables (timings aside).

The first run is the session's run of configs/test.yaml. The second is a run, in a fresh folder and fresh
processes (another PYTHONHASHSEED, another scheduling order), of a slice of it: the LLaVA-OneVision model,
dense and FastV, whose every job has exactly the params of the same job in the first run. tests/test_faults.py
reruns the Qwen2-VL model's slice (calibration, a compressed checkpoint), killed at four points, and compares
it with the first run the same way. Everything a job writes is compared: backbone and checkpoint files byte
for byte, predictions byte for byte, metrics.json and the rows of metrics.csv with the results folder's path
masked and the wall-clock fields dropped.

The embedded default (config.yaml) runs the same code on more data and longer training; what differs is
only sizes, so this slice stands for it (a full second run of it takes over an hour on 2 cores).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from helpers import REPO, TestRun, snakemake

from effivlm.config import eval_jobs, load_config

pytestmark = pytest.mark.slow

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


SLICE = derived_config(models=["llava-ov-tiny"], tasks=["count"], methods=["dense", "fastv"])


@pytest.fixture(scope="module")
def second_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("second-run")
    results, args = run_derived(workdir, SLICE)
    result = snakemake(workdir, "--cores", "2", *args, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return results


def test_a_second_run_gives_the_same_weights_predictions_and_tables(
    test_run: TestRun, second_run: Path
) -> None:
    assert test_run.result.returncode == 0, test_run.result.stderr[-3000:]
    jobs = assert_same_results(test_run.results, second_run)
    assert len(jobs) == len(eval_jobs(load_config(SLICE)))


def test_the_comparison_sees_a_changed_prediction(test_run: TestRun, second_run: Path) -> None:
    """The check above fails when one sample's answer differs (the file is restored afterwards)."""
    predictions = next(second_run.glob("eval/*/fastv/*/*/predictions.jsonl"))
    original = predictions.read_bytes()
    rows = [json.loads(line) for line in original.decode().splitlines()]
    rows[3]["prediction"] += "x"
    try:
        predictions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        with pytest.raises(AssertionError, match="fastv"):
            assert_same_results(test_run.results, second_run)
    finally:
        predictions.write_bytes(original)
