"""Incremental reruns: after a complete run, a change schedules exactly the jobs whose results it can change.

Every check is a dry run against the shared run of configs/test.yaml (dry runs leave it as it was), except
adding a task, which needs a results folder made without that task (a copy of the run, marked up to date by
``--touch``, which records params as a real run does). Jobs are counted per rule, never in total, so that new
rules do not break these tests. Complements tests/test_workflow.py (nothing to do after a complete run; one
method's params, one weights entry's params). All the Snakemake runs start at once, two at a time: each
spends most of its time importing and building the DAG.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from helpers import DRY, REPO, TestRun, command, job_counts

import effivlm

pytestmark = pytest.mark.slow

#: rules whose jobs are expensive and must never be rerun needlessly
HEAVY = ("synthetic_data", "backbone", "calibration_set", "calibrate", "compress")

_config_files = itertools.count()


def base_config() -> dict:
    return yaml.safe_load((REPO / "configs/test.yaml").read_text())


def scheduled(stdout: str, rule: str) -> list[str]:
    """The ``output:`` line of every job of ``rule`` in a dry run's listing."""
    blocks = re.finditer(rf"^(?:local)?rule {rule}:\n((?:    .*\n?)+)", stdout, re.M)
    return [m for block in blocks for m in re.findall(r"^    output: (.*)$", block[1], re.M)]


def counts(stdout: str) -> dict[str, int]:
    """Jobs per rule of a dry run ({} when there is nothing to do)."""
    return job_counts(stdout) if "Job stats:" in stdout else {}


def run(tmp: Path, workdir: Path, cfg: dict, results: Path, *args: str, python: str | None = None) -> str:
    """Snakemake with ``args`` on ``cfg`` (written to ``tmp``) and the results in ``workdir``; ``python`` is
    code run in Snakemake's process before it starts. Returns its stdout."""
    cfg_file = tmp / f"config-{next(_config_files)}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    cmd = command(workdir, *args, "--configfile", str(cfg_file), "--config", f"results={results}")
    if python is not None:
        cmd[1:3] = ["-c", f"{python}\nfrom snakemake.cli import main\nmain()"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def use_library(root: Path, code_version: str | None = None) -> str:
    """Code that imports effivlm from ``root`` (and sets its CODE_VERSION) before Snakemake puts the
    repository first on sys.path."""
    bump = "" if code_version is None else f"effivlm.CODE_VERSION = {code_version!r}\n"
    return f"import sys\nsys.path.insert(0, {str(root)!r})\nimport effivlm\n{bump}"


def edited_library(root: Path) -> Path:
    """A copy of effivlm with a change to a method's code that changes its results (random token pruning
    draws other tokens), CODE_VERSION untouched."""
    shutil.copytree(REPO / "effivlm", root / "effivlm", ignore=shutil.ignore_patterns("__pycache__"))
    random_py = root / "effivlm" / "methods" / "tokens" / "random.py"
    text = random_py.read_text()
    assert "1_000_003" in text
    random_py.write_text(text.replace("1_000_003", "1_000_033"))
    return root


def with_method(cfg: dict) -> dict:
    cfg["methods"]["pool"] = {"budgets": [0.1]}
    return cfg


def with_budget(cfg: dict) -> dict:
    cfg["methods"]["random"]["budgets"].append(0.2)
    return cfg


def reversed_order(value):
    """The same config with every mapping's keys in reverse order."""
    return {k: reversed_order(value[k]) for k in reversed(value)} if isinstance(value, dict) else value


def task_added(tmp: Path, test_run: TestRun) -> tuple[str, str]:
    """A copy of the run made without task 'count' (its jobs removed, the rest marked up to date under that
    config), then the dry runs of that config and of the config with 'count'."""
    workdir, results = tmp / "run", tmp / "run" / "results"
    shutil.copytree(test_run.results, results, symlinks=True)
    for job in results.glob("eval/*/*/*/count"):
        shutil.rmtree(job)
    without = base_config()
    del without["tasks"]["count"]
    run(tmp, workdir, without, results, "--touch", "--forceall", "--cores", "1")
    return run(tmp, workdir, without, results, *DRY), run(tmp, workdir, base_config(), results, *DRY)


@pytest.fixture(scope="module")
def plans(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """name -> the stdout of each scenario's Snakemake run(s)."""
    tmp = tmp_path_factory.mktemp("reruns")
    library = edited_library(tmp_path_factory.mktemp("edited"))
    edited = use_library(library)
    bumped = use_library(library, code_version=f"{effivlm.CODE_VERSION}+edited")

    def dry(cfg: dict, *args: str, python: str | None = None) -> Callable[[], str]:
        return lambda: run(tmp, test_run.workdir, cfg, test_run.results, *DRY, *args, python=python)

    scenarios: dict[str, Callable[[], object]] = {
        "method": dry(with_method(base_config())),
        "budget": dry(with_budget(base_config())),
        "reordered": dry(reversed_order(base_config())),
        "task": lambda: task_added(tmp_path_factory.mktemp("task"), test_run),
        "edited": dry(base_config(), python=edited),
        "bumped": dry(base_config(), python=bumped),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(scenario) for name, scenario in scenarios.items()}
        return {name: future.result() for name, future in futures.items()}


def test_a_new_method_schedules_its_jobs_and_the_tables_only(plans) -> None:
    stdout, cfg = plans["method"], with_method(base_config())
    jobs = counts(stdout)
    assert jobs["evaluate"] == len(cfg["models"]) * len(cfg["tasks"])
    assert all("/pool/0.1/" in line for line in scheduled(stdout, "evaluate"))
    assert all("/pool/" in line for line in scheduled(stdout, "efficiency"))
    assert jobs["aggregate"] == 1
    assert not set(HEAVY) & set(jobs), jobs


def test_a_new_budget_schedules_its_jobs_only(plans) -> None:
    stdout, cfg = plans["budget"], with_budget(base_config())
    jobs = counts(stdout)
    assert jobs["evaluate"] == len(cfg["models"]) * len(cfg["tasks"])
    assert all("/random/0.2/" in line for line in scheduled(stdout, "evaluate"))
    assert not set(HEAVY) & set(jobs), jobs


def test_the_order_of_a_config_changes_nothing(plans) -> None:
    """Params are compared as text: reordering sections, models, methods or their keys must not rerun."""
    assert counts(plans["reordered"]) == {}, plans["reordered"][-3000:]


def test_a_new_task_schedules_its_jobs_and_the_tables_only(plans, test_run: TestRun) -> None:
    without, stdout = plans["task"]
    assert counts(without) == {}  # the copy is complete under the config without 'count'
    jobs = counts(stdout)
    assert jobs["evaluate"] == len(list(test_run.results.glob("eval/*/*/*/count")))
    assert all("/count/metrics.json" in line for line in scheduled(stdout, "evaluate"))
    assert jobs["aggregate"] == 1
    assert not {*HEAVY, "efficiency"} & set(jobs), jobs


def test_editing_the_library_without_bumping_the_code_version_reruns_nothing(plans) -> None:
    """Snakemake does not track an imported package: a library change that changes results must bump
    effivlm.CODE_VERSION (README, 'Reruns')."""
    assert counts(plans["edited"]) == {}


def test_bumping_the_code_version_reruns_every_job(plans, test_run: TestRun) -> None:
    # the shared run started from nothing: its plan holds every job
    assert counts(plans["bumped"]) == job_counts(test_run.result.stdout + test_run.result.stderr)
    version = re.escape(repr(effivlm.CODE_VERSION))
    assert re.search(rf"reason: Params have changed since .* before: {version} now: ", plans["bumped"])


def test_every_rule_has_the_code_version_in_its_params() -> None:
    """So that a bump reruns each job for its own params, not only those downstream of one that reruns (a
    dry run cannot tell these apart: Snakemake reports a job's params only when no input of it changed, and
    in Snakemake 9.27 ``--list-changes params`` lists every output, changed or not)."""
    sources = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    rules = {}
    for source in sources:
        for match in re.finditer(
            r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)+)", source.read_text(), re.M
        ):
            rules[match[1]] = match[2]
    assert {"evaluate", "compress", "calibrate", "backbone"} <= set(rules)
    missing = [
        name
        for name, body in rules.items()
        if name != "all" and "code_version=effivlm.CODE_VERSION" not in body
    ]
    assert not missing, f"rules without code_version in their params: {missing}"
