"""The aggregation benchmark runs end to end on a slice of the paper's grid and reports its figures."""

from __future__ import annotations

from pathlib import Path

from helpers import load_benchmark


def test_quick_run_aggregates_the_paper_grid_slice(tmp_path: Path) -> None:
    bench = load_benchmark("aggregate")
    report = bench.main(["--quick", "--out", str(tmp_path / "agg")])
    (row,) = report.rows
    assert row["models"] == 1 and row["evaluations"] > 500 and row["efficiency_records"] > 40
    assert row["metrics_rows"] == row["evaluations"]
    assert row["aggregate_s"] > 0 and report.targets[0]["value_s"] == row["total_s"]
    assert (tmp_path / "agg.md").read_text().startswith("# Aggregation of the paper's grid")
