"""Faults: a job killed at any point leaves nothing that looks complete, and the rerun ends with the results of
an uninterrupted run.

- An evaluation process is SIGKILLed after some batches; its rerun generates only the batches it had not
  finished, with the same batch boundaries, and writes the same predictions and metrics as a run never killed.
- A workflow (a slice of configs/test.yaml: the Qwen2-VL model, one task, dense and Wanda 50%) is
  SIGKILLed, Snakemake and its jobs together, as a crash would: during backbone training, during compression,
  in the middle of an evaluation and during aggregation. After each kill, ``snakemake --unlock`` (the kill
  leaves Snakemake's lock) and ``--rerun-incomplete`` resume it; the final results equal those of the same
  jobs in the session's uninterrupted run of configs/test.yaml.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TestRun, assert_same_results, command, derived_config, run_derived, snakemake

from effivlm.config import eval_jobs, load_config
from effivlm.data.synthetic import write_split
from effivlm.evaluation.runner import METRICS, PREDICTIONS, run_evaluation

# ------------------------------------------------------------------------------ one evaluation process

# Runs one evaluation and SIGKILLs itself when the model is asked for batch number KILL_AT_BATCH.
KILLED_EVALUATION = """
import json, os, signal, sys
from effivlm.pipeline import Pipeline

generate, calls = Pipeline.generate, []

def generate_or_die(self, prompts, max_new_tokens=8):
    calls.append(len(prompts))
    if len(calls) == int(os.environ["KILL_AT_BATCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return generate(self, prompts, max_new_tokens)

Pipeline.generate = generate_or_die
from effivlm.evaluation.runner import run_evaluation
run_evaluation(**json.loads(sys.argv[1]))
"""


def _outputs(out: Path) -> tuple[bytes, dict]:
    metrics = json.loads((out / METRICS).read_text())
    del metrics["seconds"]
    return (out / PREDICTIONS).read_bytes(), metrics


def test_a_killed_evaluation_resumes_from_its_last_finished_batch(
    tiny_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from effivlm.pipeline import Pipeline

    data = tmp_path / "color" / "test.jsonl"
    write_split(data, "color", "test", 10, seed=0, image_size=64)
    job = {
        "model": {"name": "tiny", "family": "qwen2_vl", "path": str(tiny_paths["qwen2_vl"])},
        "method": "snapkv",
        "method_name": "snapkv",
        "method_params": {},
        "budget": 0.5,
        "task": {"name": "color", "kind": "synthetic", "data": str(data.parent)},
        "batch_size": 3,  # batches of 3, 3, 3, 1
        "max_new_tokens": 3,
    }
    run_evaluation(tmp_path / "whole", **job)

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    args = json.dumps({**job, "out_dir": str(out), "log": str(log)})
    env = {**os.environ, "KILL_AT_BATCH": "3"}
    killed = subprocess.run([sys.executable, "-c", KILLED_EVALUATION, args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    assert not (out / METRICS).exists() and not (out / PREDICTIONS).exists()
    (answers,) = out.glob(".answers-*.jsonl")
    assert len(answers.read_text().splitlines()) == 6  # the two batches it finished

    batches: list[int] = []
    generate = Pipeline.generate

    def counted(self, prompts, max_new_tokens=8):
        batches.append(len(prompts))
        return generate(self, prompts, max_new_tokens)

    monkeypatch.setattr(Pipeline, "generate", counted)
    run_evaluation(out, **job, log=log)
    assert batches == [3, 1]
    assert _outputs(out) == _outputs(tmp_path / "whole")
    assert not list(out.glob(".answers-*"))
    assert "resumed 6 of 10 samples" in log.read_text()


# ------------------------------------------------------------------------------------ a killed workflow

SLICE = derived_config(models=["qwen2-vl-tiny"], tasks=["color"], methods=["dense", "wanda_50"])


def _backbone(results: Path) -> Path:
    return results / "backbones" / "qwen2-vl-tiny"


def _checkpoint(results: Path) -> Path:
    return results / "compressed" / "qwen2-vl-tiny" / "wanda_50"


def _running(log: Path, what: str, output: Path | None = None) -> bool:
    """The job logging to ``log`` has started and neither finished nor failed (nor written ``output``)."""
    text = log.read_text() if log.is_file() else ""
    started = text.count(f"{what} started") > text.count(f"{what} finished") + text.count(f"{what} failed")
    return started and not (output is not None and output.exists())


def _answering(results: Path) -> Path | None:
    """An evaluation folder whose job has logged some answers and not finished."""
    for answers in results.glob("eval/*/*/*/*/.answers-*.jsonl"):
        if b"\n" in answers.read_bytes() and not (answers.parent / METRICS).exists():
            return answers.parent
    return None


def _run_until_one_holds(
    workdir: Path, args: list[str], conditions: dict[str, Callable[[], object]], timeout: float = 600
) -> str | None:
    """Run Snakemake in its own process group and SIGKILL the group (Snakemake and every job) as soon as one
    of ``conditions`` holds; returns its name, or None when the run ended first."""
    with open(workdir / "snakemake.out", "ab") as out:
        proc = subprocess.Popen(command(workdir, *args), stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for name, holds in conditions.items():
                if holds():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return name
            time.sleep(0.01)
        assert proc.returncode == 0, (workdir / "snakemake.out").read_text()[-5000:]
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The slice run to completion through four kills; returns its results and what each kill interrupted."""
    workdir = tmp_path_factory.mktemp("killed-run")
    results, args = run_derived(workdir, SLICE)
    logs, backbone, checkpoint = results / "logs", _backbone(results), _checkpoint(results)
    pending = {
        "backbone": lambda: _running(logs / "backbones" / "qwen2-vl-tiny.log", "training qwen2_vl", backbone),
        "compress": lambda: _running(
            logs / "compressed" / "qwen2-vl-tiny" / "wanda_50.log", "compression", checkpoint
        ),
        "evaluate": lambda: _answering(results),
        "aggregate": lambda: _running(logs / "aggregate.log", "aggregate"),
    }
    interrupted: dict[str, object] = {}
    while pending:
        name = _run_until_one_holds(workdir, ["--cores", "2", "--rerun-incomplete", *args], pending)
        assert name is not None, f"the run ended before these kill points: {sorted(pending)}"
        interrupted[name] = _what_a_kill_left(name, results)
        del pending[name]
        unlock = snakemake(workdir, "--unlock", *args)
        assert unlock.returncode == 0, unlock.stderr[-3000:]
    final = snakemake(workdir, "--cores", "2", "--rerun-incomplete", *args)
    assert final.returncode == 0, final.stderr[-5000:]
    return results, interrupted


def _what_a_kill_left(name: str, results: Path) -> object:
    """Check that the killed job left nothing that looks complete; returns what the later checks need."""
    if name == "backbone":
        assert not _backbone(results).exists()
    elif name == "compress":
        assert not _checkpoint(results).exists()
    elif name == "evaluate":
        job = _answering(results)
        assert job is not None and not (job / METRICS).exists()
        (answers,) = job.glob(".answers-*.jsonl")
        return job, len(answers.read_bytes().split(b"\n")) - 1  # complete lines
    return None


@pytest.mark.slow
def test_a_workflow_killed_four_times_ends_with_the_results_of_an_uninterrupted_run(
    test_run: TestRun, killed_run: tuple[Path, dict[str, object]]
) -> None:
    results, interrupted = killed_run
    assert sorted(interrupted) == ["aggregate", "backbone", "compress", "evaluate"]
    jobs = assert_same_results(test_run.results, results)
    assert len(jobs) == len(eval_jobs(load_config(SLICE)))
    # the evaluation killed midway resumed from the whole batches it had logged
    job, lines = interrupted["evaluate"]
    batch = SLICE["batch_size"]
    log = results / "logs" / "eval" / f"{job.relative_to(results / 'eval')}.log"
    resumed = re.findall(r"resumed (\d+) of (\d+) samples", log.read_text())
    assert resumed[-1] == (str(lines // batch * batch), str(SLICE["limit"])), resumed
    assert lines >= batch
    # nothing left behind: no temporary files or folders, no answers of unfinished jobs
    leftovers = [p for p in results.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".answers-")]
    assert not leftovers


@pytest.mark.slow
def test_job_logs_record_start_end_duration_and_progress(killed_run: tuple[Path, dict[str, object]]) -> None:
    results, _ = killed_run
    logs = {
        p.relative_to(results / "logs").as_posix(): p.read_text() for p in (results / "logs").rglob("*.log")
    }
    # the synthetic_data script only redirects its output: editing it would rerun every job downstream of it
    logs.pop("data/synthetic.log")
    assert len(logs) >= 6
    for name, text in logs.items():
        last = text.splitlines()[-1]
        assert re.search(r" started \(pid \d+\)$", text.splitlines()[0]), (name, text[:300])
        assert re.search(r" finished in \d+\.\d s$", last), (name, last)
    samples, limit = SLICE["calibration"]["samples"], SLICE["limit"]
    assert re.search(
        rf"calibration: {samples}/{samples} samples \(100%\) in \d+s", logs["calibration/qwen2-vl-tiny.log"]
    )
    assert re.search(
        rf"generation: {limit}/{limit} samples \(100%\)", logs["eval/qwen2-vl-tiny/dense/1.0/color.log"]
    )
