"""A catalogue of bad input, as a user meets it: through Snakemake.

Every case must fail early, exit non-zero, say what is wrong in ONE line of stderr (no traceback: the job's
log holds that), and leave the results already there as they were.

- Config cases are dry runs against the session's run of configs/test.yaml: they fail while the workflow
  reads its config, with one ``config: <key>: <what is wrong>`` line, and plan nothing.
- Job cases run one job on a copy of that run's results with one thing broken (a checkpoint, a data file, the
  disk...): the job fails with one ``error: <job> failed: <Error>: <what is wrong>`` line.

Snakemake's own messages (its error summary after a failed job) come on top of that line; they are not ours.
Errors in a ``--configfile`` that Snakemake itself cannot read (a missing file, broken YAML) are reported by
Snakemake before the workflow runs, and are not in this catalogue.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DRY, REPO, TestRun, command, derived_config

pytestmark = pytest.mark.slow

TEST_CONFIG = yaml.safe_load((REPO / "configs/test.yaml").read_text())
QWEN, LLAVA = "qwen2-vl-tiny", "llava-ov-tiny"


def edited(
    edit: Callable[[dict], Any] = lambda cfg: None, methods: list[str] | None = None
) -> Callable[[], dict]:
    """A config builder: configs/test.yaml with ``edit(cfg)`` applied; with ``methods``, only those variants
    on the Qwen2-VL model and the color and count tasks, without efficiency jobs (a smaller DAG to build, for
    a job case that runs one job)."""

    def build() -> dict:
        cfg = (
            copy.deepcopy(TEST_CONFIG)
            if methods is None
            else derived_config([QWEN], ["color", "count"], methods)
        )
        edit(cfg)
        return cfg

    return build


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit setting the dotted key ``path`` (keys may hold dashes, never dots)."""
    *parents, last = path.split(".")

    def edit(cfg: dict) -> None:
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


@dataclass(frozen=True)
class Plan:
    """A config that must fail while the workflow reads it; ``expect`` is in its one ``config:`` line."""

    config: Callable[[], dict]
    expect: str
    #: Python run in Snakemake's process before it starts (to give a method a family constraint)
    python: str | None = None


PLANS: dict[str, Plan] = {
    "typo-top-level-key": Plan(
        edited(_set("batchsize", 4)), "unknown key 'batchsize' at top level (did you mean 'batch_size'?)"
    ),
    "typo-nested-key": Plan(
        edited(_set(f"models.{LLAVA}.familly", "llava_onevision")),
        f"models.{LLAVA}: unknown key 'familly' (did you mean 'family'?)",
    ),
    "wrong-type": Plan(edited(_set("batch_size", "8")), "batch_size: expected integer, got string '8'"),
    "wrong-type-of-a-method-parameter": Plan(
        edited(_set("methods.random.params.seed", "0")),
        "methods.random.params.seed: expected int, got string '0'",
    ),
    "budget-above-one": Plan(
        edited(_set("methods.fastv.budgets", [0.4, 1.5])), "methods.fastv.budgets[1]: 1.5 is outside (0, 1]"
    ),
    "budget-negative": Plan(
        edited(_set("methods.snapkv.budgets", [-0.1])), "methods.snapkv.budgets[0]: -0.1 is outside (0, 1]"
    ),
    "unknown-method": Plan(
        edited(_set("methods.fastvv", {"budgets": [0.1]})),
        "methods.fastvv.method: unknown method 'fastvv' (did you mean 'fastv'?)",
    ),
    "unknown-task": Plan(
        edited(_set("tasks.colr", {"kind": "synthetic"})),
        "tasks.colr: synthetic task 'colr' is not in synthetic.tasks (did you mean 'color'?)",
    ),
    "unknown-synthetic-task": Plan(
        edited(_set("synthetic.tasks", ["color", "count", "colour"])),
        "synthetic.tasks[2]: unknown synthetic task 'colour' (did you mean 'color'?)",
    ),
    "unknown-family": Plan(
        edited(_set(f"models.{LLAVA}.family", "llava")),
        f"models.{LLAVA}.family: unknown family 'llava' (did you mean 'llava_onevision'?)",
    ),
    # No registered method is limited to some families today; this gives FastV such a limit, as a method that
    # cannot serve a family would declare it, to check the workflow refuses the config before any job.
    "method-that-cannot-serve-a-family": Plan(
        edited(),
        "methods.fastv: method 'fastv' cannot serve family 'llava_onevision'; it serves: qwen2_vl",
        python="from effivlm.methods.tokens.fastv import FastV\nFastV.families = frozenset({'qwen2_vl'})",
    ),
    "method-layer-beyond-the-model": Plan(
        edited(_set("methods.fastv.params.layer", 9)), "methods.fastv: method 'fastv': layer 9 is outside"
    ),
    "unknown-method-parameter": Plan(
        edited(_set("methods.snapkv.params", {"windw": 0.1})),
        "methods.snapkv.params.windw: unknown parameter 'windw' for method 'snapkv' (did you mean 'window'?)",
    ),
    "unknown-weights-entry": Plan(
        edited(_set("methods.wanda_50.weights", "wanda_5")),
        "methods.wanda_50.weights: unknown weights entry 'wanda_5' (did you mean 'wanda_50'?)",
    ),
    "sparsity-out-of-range": Plan(
        edited(_set("weights.wanda_50.params.sparsity", 1.0)),
        "weights.wanda_50.params: method 'wanda': sparsity 1.0 is outside [0, 1)",
    ),
    "embedded-model-on-an-lmms-task": Plan(
        edited(_set("tasks.mme", {"kind": "lmms"})),
        f"tasks.mme: embedded model '{LLAVA}' knows only the synthetic suite",
    ),
}


# ------------------------------------------------------------------------------------------------ job cases


@contextlib.contextmanager
def _keep_mtime(path: Path) -> Iterator[None]:
    """Edit ``path`` without making it look newer than what was made from it (so only the job under test
    runs, not every job downstream)."""
    stat = path.stat()
    yield
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _remove_outputs(results: Path, job: str) -> str:
    """Delete an evaluation's outputs so that it runs again; returns its metrics.json (relative)."""
    for name in ("metrics.json", "predictions.jsonl"):
        (results / "eval" / job / name).unlink()
    return f"eval/{job}/metrics.json"


def corrupt_checkpoint(results: Path) -> list[str]:
    weights = results / "compressed" / QWEN / "wanda_50" / "model.safetensors"
    with _keep_mtime(weights), weights.open("r+b") as fh:
        fh.truncate(1000)
    return [_remove_outputs(results, f"{QWEN}/wanda_50/1.0/color")]


def malformed_task_data(results: Path) -> list[str]:
    data = results / "data" / "synthetic" / "color" / "test.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # a line cut in the middle
    with _keep_mtime(data):
        data.write_text("".join(lines))
    return [_remove_outputs(results, f"{QWEN}/dense/1.0/color")]


def truncated_predictions(results: Path) -> list[str]:
    predictions = results / "eval" / QWEN / "snapkv" / "0.1" / "count" / "predictions.jsonl"
    text = predictions.read_text()
    with _keep_mtime(predictions):
        predictions.write_text(text[: len(text) // 2])
    for table in (results / "tables").iterdir():
        if table.is_file():  # the aggregate job's outputs: Snakemake deletes those of a failed job
            table.unlink()
    return ["tables/metrics.csv"]


def missing_backbone_output(results: Path) -> list[str]:
    shutil.rmtree(results / "backbones" / QWEN)
    return [f"backbones/{QWEN}"]


def missing_calibration_set(results: Path) -> list[str]:
    (results / "data" / "calibration" / "calibration.jsonl").unlink()
    return ["data/calibration/calibration.jsonl"]


def rerun_dense(results: Path) -> list[str]:
    return [_remove_outputs(results, f"{QWEN}/dense/1.0/color")]


def path_model_on(results: Path) -> list[str]:
    return ["eval/local/dense/1.0/color/metrics.json"]


@dataclass(frozen=True)
class Job:
    """One job run on a copy of the shared results after ``setup`` broke something; ``expect`` is in its one
    ``error:`` line."""

    config: Callable[[], dict]
    setup: Callable[[Path], list[str]]  # breaks the copy, returns the targets (relative to the results)
    expect: str
    mount: str | None = None  # "full" (a tmpfs with no space left) or "read-only"


def _path_model(path: str) -> Callable[[dict], None]:
    """Replace the models by one whose weights are given by ``path``."""

    def edit(cfg: dict) -> None:
        cfg["models"] = {"local": {"family": "qwen2_vl", "source": "path", "path": path}}
        cfg["methods"] = {"dense": {}}
        cfg["weights"] = {}
        cfg["efficiency"] = {"models": []}

    return edit


SCORER = "def process_results(doc, results):\n    raise RuntimeError('the task scorer crashed on doc ' + doc['id'])\n"


def _lmms_task_that_fails(cfg: dict) -> None:
    """A local lmms-eval task (the synthetic template, its scorer replaced by one that raises) on the trained
    Qwen2-VL backbone of the shared run."""
    _path_model("{results}/backbones/" + QWEN)(cfg)
    cfg.pop("synthetic")
    cfg["tasks"] = {"broken": {"kind": "lmms", "include_path": "{workdir}/tasks"}}


def lmms_task_setup(results: Path) -> list[str]:
    tasks = results.parent / "tasks"
    tasks.mkdir()
    (tasks / "scorer.py").write_text(SCORER)
    template = REPO / "effivlm" / "evaluation" / "task_templates" / "synthetic.yaml"
    data = results / "data" / "synthetic" / "color" / "test.jsonl"
    (tasks / "broken.yaml").write_text(
        f'include: "{template}"\ntask: broken\n'
        f'dataset_kwargs: {{"data_files": {{"train": "{data}"}}}}\n'
        'generation_kwargs: {"max_new_tokens": 4, "until": ["\\n"]}\n'
        "process_results: !function scorer.process_results\n"
    )
    return ["eval/local/dense/1.0/broken/metrics.json"]


JOBS: dict[str, Job] = {
    "missing-weights-path": Job(
        edited(_path_model("/nonexistent/weights/qwen2-vl")),
        path_model_on,
        "ValueError: model path '/nonexistent/weights/qwen2-vl' does not exist",
    ),
    "corrupt-checkpoint": Job(
        edited(methods=["dense", "wanda_50"]), corrupt_checkpoint, "are corrupt or truncated"
    ),
    "malformed-task-data": Job(
        edited(methods=["dense"]), malformed_task_data, "data/synthetic/color/test.jsonl line 3: not JSON"
    ),
    "missing-calibration-file": Job(
        edited(_set("calibration.path", "/nonexistent/sharegpt4v.json"), methods=["dense", "wanda_50"]),
        missing_calibration_set,
        "calibration file /nonexistent/sharegpt4v.json cannot be read: No such file or directory",
    ),
    "truncated-predictions": Job(
        edited(methods=["dense", "snapkv"]), truncated_predictions, "snapkv/0.1/count/predictions.jsonl"
    ),
    "backbone-below-min-accuracy": Job(
        edited(_set(f"models.{QWEN}.train.min_accuracy", 0.99), methods=["dense"]),
        missing_backbone_output,
        "held-out accuracy below min_accuracy 0.99",
    ),
    "lmms-eval-failing-inside-a-job": Job(
        edited(_lmms_task_that_fails), lmms_task_setup, "RuntimeError: the task scorer crashed on doc"
    ),
    "full-results-folder": Job(edited(methods=["dense"]), rerun_dense, "No space left on device", "full"),
    "read-only-results-folder": Job(
        edited(methods=["dense"]), rerun_dense, "is not writable: Read-only file system", "read-only"
    ),
}


# ------------------------------------------------------------------------------------------------ running


def checksums(results: Path) -> dict[str, str]:
    """sha256 of every file under ``results``, except logs and hidden files (a job's own temporaries)."""
    return {
        str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(results.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(results).parts and not p.name.startswith(".")
    }


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


def _launch(
    workdir: Path, cfg_file: Path, cfg: dict, args: list[str], python: str | None = None
) -> subprocess.Popen[str]:
    cfg_file.write_text(yaml.safe_dump(cfg))
    cmd = command(workdir, *args, "--configfile", str(cfg_file))
    if python is not None:
        cmd[1:3] = ["-c", f"{python}\nfrom snakemake.cli import main\nmain()"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def plans(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every config case at once (each spends its time importing), against the shared run's results."""
    before = checksums(test_run.results)
    configs = tmp_path_factory.mktemp("bad-configs")
    procs = {
        name: _launch(
            test_run.workdir,
            configs / f"{name}.yaml",
            {**case.config(), "results": str(test_run.results)},
            list(DRY),
            case.python,
        )
        for name, case in PLANS.items()
    }
    done = {name: _finish(proc) for name, proc in procs.items()}
    after = checksums(test_run.results)
    return {name: Outcome(result, before, after) for name, result in done.items()}


def _mount(kind: str, results: Path) -> None:
    """Make ``results`` (a full copy) a tmpfs with no space left, or read-only; skips when mounting fails."""
    if kind == "full":
        source = results.with_name("source")
        results.rename(source)
        results.mkdir()
        size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) + (8 << 20)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(results)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
        shutil.copytree(source, results, dirs_exist_ok=True)
        with contextlib.suppress(OSError), open(results / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * (1 << 20))
    else:
        steps = [
            ["mount", "--bind", str(results), str(results)],
            ["mount", "-o", "remount,bind,ro", str(results)],
        ]
        for step in steps:
            if subprocess.run(step, capture_output=True).returncode != 0:
                pytest.skip("cannot make a read-only bind mount here (needs root and mount rights)")


def _prepare(case: Job, test_run: TestRun, workdir: Path) -> tuple[Path, list[str], dict]:
    """A copy of the shared results with ``case``'s fault; returns it, the Snakemake arguments and config."""
    results = workdir / "results"
    shutil.copytree(test_run.results, results, symlinks=True)
    targets = case.setup(results)
    if case.mount is not None:
        _mount(case.mount, results)
    text = yaml.safe_dump({**case.config(), "results": str(results)})
    cfg = yaml.safe_load(text.replace("{results}", str(results)).replace("{workdir}", str(workdir)))
    return results, ["--cores", "1", *(f"{results}/{target}" for target in targets)], cfg


@pytest.fixture(scope="module")
def jobs(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """Every job case, three at a time, each on its own copy of the shared run's results."""
    outcomes: dict[str, Outcome] = {}
    mounted: list[Path] = []
    names = list(JOBS)
    try:
        for start in range(0, len(names), 3):
            running = {}
            for name in names[start : start + 3]:
                workdir = tmp_path_factory.mktemp(f"job-{name}")
                try:
                    results, args, cfg = _prepare(JOBS[name], test_run, workdir)
                except pytest.skip.Exception as skip:
                    outcomes[name] = Outcome(subprocess.CompletedProcess([], 0), {}, skipped=skip.msg)
                    continue
                if JOBS[name].mount is not None:
                    mounted.append(results)
                before = checksums(results)
                running[name] = (_launch(workdir, workdir / "config.yaml", cfg, args), results, before)
            for name, (proc, results, before) in running.items():
                outcomes[name] = Outcome(_finish(proc), before, checksums(results))
        yield outcomes
    finally:
        for results in mounted:
            subprocess.run(["umount", str(results)], check=False)


def _one_line(outcome: Outcome, prefix: str, expect: str) -> None:
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    result = outcome.result
    assert result.returncode != 0, result.stdout[-3000:]
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-5000:]
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-5000:]
    assert outcome.after == outcome.before, "the results already there changed"


@pytest.mark.parametrize("name", PLANS)
def test_a_bad_config_fails_before_any_job_with_one_line(name: str, plans: dict[str, Outcome]) -> None:
    outcome = plans[name]
    _one_line(outcome, "config: ", PLANS[name].expect)
    assert "Job stats" not in outcome.result.stdout


@pytest.mark.parametrize("name", JOBS)
def test_a_bad_input_fails_its_job_with_one_line_and_loses_nothing(
    name: str, jobs: dict[str, Outcome]
) -> None:
    _one_line(jobs[name], "error: ", JOBS[name].expect)


# ---------------------------------------------------------------------------- the mechanisms, one by one


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_an_uncaught_job_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    code = f"from effivlm.io import log_to_file\nwith log_to_file({str(log)!r}, 'demo'):\n    raise ValueError('bad\\n  input')"
    result = _python(code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: demo failed: ValueError: bad input (traceback in {log})"
    ]
    text = log.read_text()
    assert "demo started" in text and "demo failed after" in text and "Traceback" in text


def test_an_error_someone_catches_is_not_reported_and_others_keep_their_traceback(tmp_path: Path) -> None:
    code = (
        "from effivlm.io import log_to_file\n"
        "try:\n"
        f"    with log_to_file({str(tmp_path / 'job.log')!r}, 'demo'):\n"
        "        raise ValueError('handled')\n"
        "except ValueError:\n"
        "    pass\n"
        "raise KeyError('not from a job')\n"
    )
    result = _python(code)
    assert result.returncode == 1
    assert "error: demo" not in result.stderr
    assert "Traceback" in result.stderr and "KeyError: 'not from a job'" in result.stderr


def test_a_retry_wrapper_is_reported_with_the_error_it_wraps() -> None:
    from effivlm.io import describe_error

    try:
        try:
            raise RuntimeError("the real\ncause")
        except RuntimeError as cause:
            raise ValueError("RetryError[<Future ...>]") from cause
    except ValueError as err:
        assert describe_error(err) == (
            "ValueError: RetryError[<Future ...>] (caused by RuntimeError: the real cause)"
        )


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_fails_the_job_at_its_first_log_line(small_tmpfs: Path) -> None:
    """Logging would print a traceback for every record it cannot write and carry on; a job's log raises."""
    with contextlib.suppress(OSError), open(small_tmpfs / "filler", "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)
    from effivlm.io import check_writable, log_to_file

    with (
        pytest.raises(OSError, match="No space left on device"),
        log_to_file(small_tmpfs / "job.log", "demo"),
    ):
        pass
    with pytest.raises(
        OSError, match=f"results folder {small_tmpfs} is not writable: No space left on device"
    ):
        check_writable(small_tmpfs)


def test_a_read_only_folder_is_named(small_tmpfs: Path) -> None:
    from effivlm.io import check_writable

    check_writable(small_tmpfs / "results")  # created, written and cleaned
    assert list((small_tmpfs / "results").iterdir()) == []
    if subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    with pytest.raises(OSError, match="is not writable: Read-only file system"):
        check_writable(small_tmpfs / "results")
