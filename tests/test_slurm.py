"""The workflow on a real single-node SLURM cluster, through the project's own profile (slurm/config.yaml).

scripts/install_slurm.sh installs SLURM and munge from the distribution's packages; scripts/slurm_cluster.sh
starts slurmctld and slurmd with no accounting database (so the profile's `slurm-status-command: squeue` is
what lets Snakemake see jobs finish). configs/test.yaml then runs with `--profile slurm`, and the test checks
that every job other than the local rules ran inside a SLURM job that SLURM saw complete, and that the tables and
every evaluation's predictions equal those of the local run (the session's `test_run`), timing aside.

Speed: every SLURM job parses the workflow twice (the job step, then the job itself; about 7 s of CPU each on
2 cores) before its script starts, and the executor polls with a growing interval (+10 s after each check that
finds nothing finished); one SLURM job for each of the ~60 jobs, most of them seconds long, would about double
the local run. So the preparation jobs (data, training, calibration, compression) go one per SLURM job, as
documented, and the evaluation and efficiency jobs go in two group jobs (`--groups`, `--group-components`),
capped by `--cores` like a real group submission must be.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, TestRun, snakemake

pytestmark = pytest.mark.slow

INSTALL = REPO / "scripts" / "install_slurm.sh"
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
PARTITION = "effivlm-test"
#: CPUs the node declares: twice the real cores, so that a job's workflow parsing and the executor's polling
#: overlap with another job's work
NODE_CPUS = 2 * len(os.sched_getaffinity(0))
#: group jobs the evaluation and efficiency jobs are packed into (two run at once on the node)
EVAL_GROUPS = 2
#: columns measured with a clock (or the allocator): they differ between any two runs
TIMING = re.compile(r"ttft|decode_ms|decode_q\d|decode_speedup|tokens_per_s|peak_memory")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running single-node cluster for the session; returns its state folder (logs in it)."""
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root here (slurmd runs jobs as their user)")
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("SLURM is not installed and there is no apt-get to install it")
        install = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, check=False)
        if shutil.which("slurmctld") is None:
            pytest.skip(f"SLURM could not be installed: {(install.stdout + install.stderr).strip()}")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "EFFIVLM_SLURM_DIR": str(state)}
    cluster = ["bash", str(CLUSTER)]
    start = [*cluster, "start", "--cpus", str(NODE_CPUS), "--partition", PARTITION]
    started = subprocess.run(start, capture_output=True, text=True, env=env, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield state
    finally:
        subprocess.run([*cluster, "stop"], capture_output=True, env=env, check=False)


@pytest.fixture(scope="module")
def slurm_run(slurm: Path, test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> TestRun:
    """configs/test.yaml through SLURM with the repository's profile, in a fresh working directory."""
    assert test_run.result.returncode == 0, "the local run failed: nothing to compare with"
    workdir = tmp_path_factory.mktemp("slurm-run")
    results = workdir / "results"
    jobs = rules_run(test_run.result.stdout + test_run.result.stderr)
    per_group = -(-(jobs["evaluate"] + jobs["efficiency"]) // EVAL_GROUPS)  # ceil
    args = ("--configfile", str(REPO / "configs/test.yaml"), "--config", f"results={results}")
    result = snakemake(
        workdir,
        "--profile",
        str(REPO / "slurm"),
        "--cores",
        "2",  # as the local run: the efficiency jobs claim --cores threads
        *args,
        "--groups",
        "evaluate=eval",
        "efficiency=eval",
        "--group-components",
        f"eval={per_group}",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
        "--latency-wait",
        "5",
        timeout=1800,
        # The node declares twice the real cores, so two 2-thread jobs share 2 cores: OpenMP threads that spin
        # while they wait then slow both about 3x (two test backbones trained at once: 76 s spinning, 23 s
        # passive). A real cluster gives each job its own cores; the answers are the same either way.
        env={"OMP_WAIT_POLICY": "PASSIVE"},
    )
    return TestRun(workdir, results, result)


def rules_run(text: str) -> Counter[str]:
    """Jobs a Snakemake process ran itself, by rule ("localrule NAME:" opens each)."""
    return Counter(re.findall(r"^localrule (\w+):$", text, re.M))


def local_rules() -> set[str]:
    """The Snakefile's `localrules:` (they run in the submitting process under any executor)."""
    block = re.search(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", (REPO / "Snakefile").read_text(), re.M)
    assert block is not None, "no localrules block in the Snakefile"
    return set(re.findall(r"\w+", block.group(1)))


def comparable(path: Path, results: Path) -> pd.DataFrame:
    """A table with its timing columns dropped and the run's results folder replaced by a placeholder."""
    table = pd.read_csv(path)
    table = table.drop(columns=[c for c in table.columns if TIMING.search(c)])
    if "cost" in table.columns:  # Pareto fronts over a timed cost move with the timing
        table = table[~table["cost"].astype(str).str.contains(TIMING)].reset_index(drop=True)
    for column in table.columns:
        if pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].str.replace(str(results), "<results>", regex=False)
    return table


def test_the_test_config_runs_through_slurm(slurm: Path, slurm_run: TestRun, test_run: TestRun) -> None:
    assert test_run.result.returncode == 0, test_run.result.stderr[-3000:]
    main = slurm_run.result.stdout + slurm_run.result.stderr
    assert slurm_run.result.returncode == 0, main[-5000:]

    # every submitted SLURM job ran and SLURM saw it exit 0 (slurmctld's own log: there is no sacct here)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", main)
    assert submitted, main[-3000:]
    controller = (slurm / "slurmctld.log").read_text()
    for jobid in submitted:
        assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in controller, (
            f"SLURM job {jobid} did not exit 0"
        )

    # every job of the local run ran exactly once here: the local rules in this process, all others inside
    # SLURM jobs (their logs, kept under .snakemake/slurm_logs, hold one "localrule" per job they ran)
    logs = sorted((slurm_run.workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert len(logs) == len(submitted)
    in_slurm = sum((rules_run(log.read_text()) for log in logs), Counter())
    here = rules_run(main)
    assert set(here) <= local_rules(), f"ran outside SLURM: {set(here) - local_rules()}"
    assert in_slurm + here == rules_run(test_run.result.stdout + test_run.result.stderr)
    assert in_slurm["evaluate"] > 0 and in_slurm["backbone"] > 0

    # the same results as the local run
    tables = sorted(p.relative_to(test_run.results) for p in (test_run.results / "tables").rglob("*.csv"))
    assert tables and tables == sorted(
        p.relative_to(slurm_run.results) for p in (slurm_run.results / "tables").rglob("*.csv")
    )
    for name in tables:
        pd.testing.assert_frame_equal(
            comparable(slurm_run.results / name, slurm_run.results),
            comparable(test_run.results / name, test_run.results),
            check_exact=True,
            obj=str(name),
        )
    predictions = sorted(p.relative_to(test_run.results) for p in test_run.results.rglob("predictions.jsonl"))
    assert predictions
    for name in predictions:
        assert (slurm_run.results / name).read_text() == (test_run.results / name).read_text(), name
