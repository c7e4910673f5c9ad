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

import json
from pathlib import Path

import pytest
from helpers import TestRun, assert_same_results, derived_config, run_derived, snakemake

from effivlm.config import eval_jobs, load_config

pytestmark = pytest.mark.slow

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
