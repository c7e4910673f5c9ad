"""Planning the paper's full grid: how long ``snakemake -n`` takes, fresh and once everything is complete.

The grid is configs/paper.yaml's (``--configfile`` for another): 3 models x every method x 3 budgets x 15 tasks,
the parameter-compression checkpoints and the variants on them, the efficiency jobs, the tables and figures;
the job count is read from Snakemake's own "Job stats" table, never assumed. Each run is the command a user types,
in a fresh process (interpreter start, imports, parsing the workflow and validating the config included), in
a temporary working directory, with the output captured:

1. plan: ``snakemake --dry-run --cores 2`` with no output present: every job is listed.
2. no-op rerun: the same command once every output exists and carries the metadata a finished job leaves; it
   must answer "Nothing to be done" (the benchmark fails otherwise). This is the check of every job's
   params, code, input checksums and mtimes that a user pays each time they resume or extend a finished run.

How the run is made complete (not timed): one dry run through Snakemake's Python API, in this process, lists the
jobs and their outputs, with ``directory()`` outputs known as such; every output is created (empty files,
empty folders), all with one modification time (an input no newer than its output triggers nothing), and each
job is recorded as finished through Snakemake's own persistence (``workflow.persistence.finished``: the call
that follows a real job, writing its params, code, input checksums and software environment into
.snakemake/metadata). ``snakemake --touch`` would do the same but creates no missing output and sleeps
0.1 s per job (4 minutes for the paper's grid). The API's workflow object (``WorkflowApi._workflow``) is not a
public interface: if a Snakemake release changes it, the check of step 2 says so.

Each step runs ``--repeats`` times; the table shows the minimum wall time (other load on a shared machine only
adds) and the CPU time of that run (its process's user + system time, which another process's load does not
inflate). Target of the issue: each under 15 s on 2 cores.

Run ``python benchmarks/dryrun.py --help``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import snakemake

from effivlm.efficiency.bench import Report, markdown, positive, progress, run_benchmark

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TARGET_S = 15.0
NOTHING_TO_DO = "Nothing to be done"
MISSING_METADATA = "missing provenance/metadata"


@dataclass(frozen=True)
class Timed:
    """One ``snakemake`` command: wall and CPU seconds, exit status and output (stdout + stderr)."""

    wall_s: float
    cpu_s: float
    returncode: int
    output: str


# ---------------------------------------------------------------------------------------------- configuration
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configfile", type=Path, default=REPO / "configs/paper.yaml", help="default configs/paper.yaml"
    )
    p.add_argument("--cores", type=positive, default=2, help="--cores of the dry runs (default 2)")
    p.add_argument("--repeats", type=positive, default=3, help="runs of each step, minimum shown (default 3)")
    p.add_argument("--workdir", type=Path, help="Snakemake's working directory (default: a temporary one)")
    p.add_argument("--out", type=Path, help="write the tables to OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.configfile = args.configfile.resolve()
    if not args.configfile.is_file():
        p.error(f"--configfile {args.configfile} does not exist")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir {args.workdir} is not empty (the first step needs no output present)")
    return args


# ---------------------------------------------------------------------------------------------- the steps
def dry_run(workdir: Path, configfile: Path, cores: int) -> Timed:
    """``snakemake --dry-run`` of the repository's workflow in a new process, timed."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    cmd += ["--configfile", str(configfile), "--dry-run", "--cores", str(cores)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(wall, cpu, proc.returncode, proc.stdout + proc.stderr)


def job_count(output: str) -> int:
    """The total of a dry run's "Job stats" table; 0 when Snakemake found nothing to do."""
    if NOTHING_TO_DO in output:
        return 0
    match = re.search(r"^total\s+(\d+)\s*$", output, re.M)
    if match is None:
        raise RuntimeError(f"no job count in the dry run's output:\n{output[-3000:]}")
    return int(match.group(1))


def complete_run(workdir: Path, configfile: Path) -> int:
    """Make the workflow's run in ``workdir`` look finished: create every output of every job the plan lists
    and record each job as finished in .snakemake/metadata (see the module's docstring). Returns the jobs."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            ResourceSettings(cores=1),
            ConfigSettings(configfiles=[configfile]),
            snakefile=SNAKEFILE,
            workdir=workdir,
        )
        workflow_api.dag(DAGSettings()).execute_workflow(executor="dryrun")
        workflow = workflow_api._workflow
        jobs = list(workflow.dag.needrun_jobs(exclude_finished=False))
        outputs = []
        for job in jobs:
            for output in job.output:
                path = Path(output)  # relative to workdir, the API's current directory here
                if output.is_directory:
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                outputs.append(path)
        # one time for all (after the folders' contents exist): no output is older than its inputs
        stamp = time.time()
        for path in outputs:
            os.utime(path, (stamp, stamp))
        for job in jobs:
            workflow.async_run(workflow.persistence.finished(job))
    return len(jobs)


def check_rerun(timed: Timed) -> None:
    """The no-op rerun must find nothing to do, with every job's metadata (else it checked less than a real
    finished run and its time would flatter)."""
    if timed.returncode != 0 or NOTHING_TO_DO not in timed.output or MISSING_METADATA in timed.output:
        raise RuntimeError(
            f"the rerun of a completed run did not say '{NOTHING_TO_DO}' with full metadata "
            f"(exit {timed.returncode}):\n{timed.output[-3000:]}"
        )


def best(runs: list[Timed]) -> Timed:
    return min(runs, key=lambda r: r.wall_s)


# ---------------------------------------------------------------------------------------------- report
def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[Timed], float, int, list[Timed]]:
    plans = []
    for _ in range(args.repeats):
        plans.append(dry_run(workdir, args.configfile, args.cores))
        progress(f"plan: {plans[-1].wall_s:.1f} s")
        if plans[-1].returncode != 0:
            raise RuntimeError(
                f"the dry run failed (exit {plans[-1].returncode}):\n{plans[-1].output[-3000:]}"
            )
    start = time.perf_counter()
    completed = complete_run(workdir, args.configfile)
    complete_s = time.perf_counter() - start
    progress(f"complete: {completed} jobs in {complete_s:.1f} s")
    reruns = []
    for _ in range(args.repeats):
        reruns.append(dry_run(workdir, args.configfile, args.cores))
        check_rerun(reruns[-1])
        progress(f"no-op rerun: {reruns[-1].wall_s:.1f} s")
    return plans, complete_s, completed, reruns


def run(args: argparse.Namespace) -> Report:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        plans, complete_s, completed, reruns = measure(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="effivlm-bench-dryrun-") as tmp:
            plans, complete_s, completed, reruns = measure(args, Path(tmp))
    plan, rerun = best(plans), best(reruns)
    jobs = job_count(plan.output)
    rows: list[dict[str, Any]] = [
        {"step": "plan", "jobs": jobs, "wall_s": plan.wall_s, "cpu_s": plan.cpu_s, "result": f"{jobs} jobs"},
        {
            "step": "no-op rerun",
            "jobs": job_count(rerun.output),
            "wall_s": rerun.wall_s,
            "cpu_s": rerun.cpu_s,
            "result": NOTHING_TO_DO,
        },
    ]
    targets = [
        {
            "target": f"{row['step']} < {TARGET_S:.0f} s",
            "value_s": row["wall_s"],
            "met": row["wall_s"] < TARGET_S,
        }
        for row in rows
    ]
    setup = {
        "configfile": str(args.configfile),
        "cores": args.cores,
        "repeats": args.repeats,
        "cpus": len(os.sched_getaffinity(0)),
        "snakemake": snakemake.__version__,
        "python": sys.version.split()[0],
        "complete_s": complete_s,
        "completed_jobs": completed,
    }
    lines = [
        f"# snakemake --dry-run on {display(args.configfile)}",
        "",
        f"snakemake {snakemake.__version__}, --cores {args.cores}, {setup['cpus']} CPUs; minimum wall time of "
        f"{args.repeats} run(s) per step and that run's CPU time (user + system).",
        "",
        *markdown(
            ["step", "jobs", "wall s", "cpu s", "result"],
            [
                [r["step"], str(r["jobs"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", r["result"]]
                for r in rows
            ],
        ),
        "",
        f"Completing the run (not timed above): {completed} jobs' outputs and metadata in {complete_s:.1f} s.",
        "",
        "## Targets of the issue",
        *markdown(
            ["target", "wall s", "met"],
            [[t["target"], f"{t['value_s']:.1f}", "yes" if t["met"] else "no"] for t in targets],
        ),
    ]
    return Report(lines, rows, targets, setup)


def display(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: Sequence[str] | None = None) -> Report:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
