"""The dry-run benchmark on the small test config: it counts the planned jobs, completes the run and finds
nothing to do on the rerun."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, load_benchmark, table_rows


def test_plan_and_noop_rerun_on_the_test_config(capsys, tmp_path):
    bench = load_benchmark("dryrun")
    workdir = tmp_path / "run"
    out = tmp_path / "d"
    report = bench.main(
        [
            "--configfile",
            str(REPO / "configs/test.yaml"),
            "--repeats",
            "1",
            "--workdir",
            str(workdir),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out

    rows = {cells[0]: cells for cells in table_rows(printed, "# snakemake --dry-run")}
    assert list(rows) == ["plan", "no-op rerun"]
    plan, rerun = report.rows
    assert plan["jobs"] > 0 and rows["plan"][1] == str(plan["jobs"])
    assert rerun["jobs"] == 0 and rows["no-op rerun"][4] == "Nothing to be done"
    assert plan["wall_s"] > 0 and plan["cpu_s"] > 0 and rerun["wall_s"] > 0
    # every job the plan listed was completed, with its outputs and metadata
    assert report.setup["completed_jobs"] == plan["jobs"]
    assert (workdir / ".snakemake" / "metadata").is_dir()
    assert [t["target"] for t in report.targets] == ["plan < 15 s", "no-op rerun < 15 s"]

    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in saved["rows"]] == ["plan", "no-op rerun"]
    assert out.with_suffix(".md").read_text().startswith("# snakemake --dry-run on configs/test.yaml")


def test_an_incomplete_run_is_not_taken_for_a_noop(tmp_path):
    """The check of the rerun refuses output that still plans jobs or lacks metadata."""
    bench = load_benchmark("dryrun")
    planned = bench.Timed(1.0, 1.0, 0, "Job stats:\njob  count\n---  ---\nevaluate  3\ntotal  3\n")
    with pytest.raises(RuntimeError, match="Nothing to be done"):
        bench.check_rerun(planned)
    partial = bench.Timed(1.0, 1.0, 0, "Nothing to be done.\n3 jobs have missing provenance/metadata so that")
    with pytest.raises(RuntimeError):
        bench.check_rerun(partial)
    assert bench.job_count(planned.output) == 3
