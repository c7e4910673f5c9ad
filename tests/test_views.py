"""OE, Pareto frontiers, the paper's tables and the new figures, from hand-made records with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_reporting import DENSE_T1, DENSE_T2, jobs, row, write_job  # noqa: F401  (jobs is a fixture)

from effivlm.metrics.pareto import pareto_mask
from effivlm.reporting.aggregate import aggregate
from effivlm.reporting.efficiency import (
    EfficiencyError,
    build_efficiency_table,
    geometric_mean,
    load_efficiency,
    with_efficiency,
)
from effivlm.reporting.figures import plot_loyalty_heatmap, plot_pareto
from effivlm.reporting.tables import latex_escape, to_latex, write_paper_tables

SETTINGS = {"backbone": "random", "repeats": 3}


def write_record(
    root: Path,
    model: str,
    method: str,
    budget: float,
    ttft: float,
    decode: float,
    *,
    flops: float = 100.0,
    memory: int = 1000,
    kv: int = 50,
    settings: dict | None = None,
) -> Path:
    """An efficiency record whose quartiles are 10% either side of the median."""
    path = root / model / method / f"{budget}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def spread(m: float) -> dict[str, float]:
        return {"median": m, "q1": 0.9 * m, "q3": 1.1 * m, "min": 0.8 * m, "max": 1.2 * m}

    record = {
        "model": model,
        "family": "qwen2_vl",
        "method": method,
        "method_name": method,
        "budget": budget,
        "weights": None,
        "settings": settings or SETTINGS,
        "ttft": spread(ttft),
        "decode": spread(decode),
        "tokens_per_s": 1e3 / decode,
        "peak_memory_bytes": memory,
        "kv_bytes": kv,
        "kv_bytes_dense": 50,
        "prefill_flops": flops,
        "decode_flops": flops / 100,
    }
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def records(tmp_path: Path) -> list[Path]:
    """m1: dense 100 ms / 10 ms; random@0.1 50 ms / 5 ms (2x, 2x), random@0.4 80 ms / 10 ms (1.25x, 1x).
    m2: dense 200 ms / 20 ms; random@0.1 50 ms / 10 ms (4x, 2x), random@0.4 200 ms / 20 ms (1x, 1x)."""
    root = tmp_path / "efficiency"
    return [
        write_record(root, "m1", "dense", 1.0, 100, 10),
        write_record(root, "m1", "random", 0.1, 50, 5, flops=40, memory=900, kv=5),
        write_record(root, "m1", "random", 0.4, 80, 10, flops=70, kv=20),
        write_record(root, "m2", "dense", 1.0, 200, 20),
        write_record(root, "m2", "random", 0.1, 50, 10, flops=40, kv=5),
        write_record(root, "m2", "random", 0.4, 200, 20, flops=70, kv=20),
    ]


def test_speedups_and_shares_computed_by_hand(records: list[Path]) -> None:
    table = build_efficiency_table(load_efficiency(records))
    r = row(table, model="m1", method="random", budget=0.1)
    assert r["ttft_speedup"] == 2.0 and r["decode_speedup"] == 2.0
    assert r["ttft_speedup_lo"] == pytest.approx(90 / 55) and r["ttft_speedup_hi"] == pytest.approx(110 / 45)
    assert r["prefill_flops_share"] == 0.4 and r["peak_memory_share"] == 0.9 and r["kv_share"] == 0.1
    # overall: geometric mean over models, sqrt(2 * 4) for TTFT at 0.1
    o = row(table, model="overall", method="random", budget=0.1)
    assert o["ttft_speedup"] == pytest.approx(math.sqrt(8)) and o["decode_speedup"] == pytest.approx(2.0)
    o4 = row(table, model="overall", method="random", budget=0.4)
    assert o4["ttft_speedup"] == pytest.approx(math.sqrt(1.25))
    # dense against itself: every ratio exactly 1, and 1 lies inside its own quartile band
    for model in ("m1", "m2", "overall"):
        d = row(table, model=model, method="dense", budget=1.0)
        for col in ("ttft_speedup", "decode_speedup", "prefill_flops_share", "peak_memory_share", "kv_share"):
            assert d[col] == pytest.approx(1.0), (model, col)
        assert d["ttft_speedup_lo"] < 1 < d["ttft_speedup_hi"]
    assert list(table["model"])[-3:] == ["overall"] * 3  # overall rows last


def test_geometric_mean_is_undefined_with_an_undefined_value() -> None:
    assert geometric_mean(pd.Series([2.0, 8.0])) == pytest.approx(4.0)
    assert math.isnan(geometric_mean(pd.Series([2.0, math.nan])))
    assert math.isnan(geometric_mean(pd.Series([], dtype=float)))


def test_pareto_mask_by_hand() -> None:
    # points (quality, speedup): a (1.0, 1) b (0.9, 2) c (0.8, 2) d (0.5, 4) e (0.9, 1.5) f (nan, 9)
    quality = np.array([1.0, 0.9, 0.8, 0.5, 0.9, math.nan])
    speed = np.array([1.0, 2.0, 2.0, 4.0, 1.5, 9.0])
    assert pareto_mask(quality, speed, True).tolist() == [True, True, False, True, False, False]
    # as a cost where lower is better (shares), the cheapest and the best are the ends of the frontier
    share = 1 / speed
    assert pareto_mask(quality, share, False).tolist() == [True, True, False, True, False, False]
    # equal points do not dominate each other
    assert pareto_mask(np.array([1.0, 1.0]), np.array([2.0, 2.0]), True).tolist() == [True, True]
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        pareto_mask(np.zeros(2), np.zeros(3), True)


def test_aggregate_joins_oe_to_the_summary_and_draws_the_frontier(jobs, records, tmp_path: Path) -> None:  # noqa: F811
    out = aggregate(jobs, tmp_path / "tables", efficiency_files=records)
    summary = pd.read_csv(out["summary"])
    # m1 @ 0.1: OP = sqrt((0.5^2 + 1^2) / 2), TTFT 2x; @ 0.4: OP 1, TTFT 1.25x; dense OP 1, TTFT 1x
    r = row(summary, model="m1", method="random", budget=0.1)
    assert r["OP"] == pytest.approx(math.sqrt(0.625)) and r["ttft_speedup"] == 2.0
    pareto = pd.read_csv(out["pareto"])
    front = pareto[
        (pareto["model"] == "m1") & (pareto["quality"] == "OP") & (pareto["cost"] == "ttft_speedup")
    ]
    on = {(m, b) for m, b, f in zip(front["method"], front["budget"], front["on_front"], strict=True) if f}
    # random@0.4 has dense's quality and a higher speed: it dominates dense; random@0.1 is faster still
    assert on == {("random", 0.4), ("random", 0.1)}
    # m2: random@0.4 ties dense on both axes, so neither dominates the other
    front2 = pareto[
        (pareto["model"] == "m2") & (pareto["quality"] == "OP") & (pareto["cost"] == "ttft_speedup")
    ]
    assert front2["on_front"].all()
    assert set(pareto["cost"]) == {
        "ttft_speedup",
        "decode_speedup",
        "prefill_flops_share",
        "peak_memory_share",
        "kv_share",
    }
    assert (tmp_path / "tables" / "summary.md").read_text().count("TTFT x") == 1

    written = write_paper_tables(out["metrics"], out["summary"], out["efficiency"], tmp_path / "paper")
    assert set(written) == {"scores", "op", "og_ol", "compression", "efficiency"}
    scores = pd.read_csv(tmp_path / "paper" / "scores.csv")
    assert list(scores.columns) == ["model", "method", "budget", "t1", "t2", "OP"]
    assert row(scores, model="m2", method="random", budget=0.1)["t2"] == 0.25
    op = pd.read_csv(tmp_path / "paper" / "op.csv")
    assert list(op.columns) == ["method", "m1 100%", "m1 40%", "m1 10%", "m2 100%", "m2 40%", "m2 10%",
                                "overall 100%", "overall 40%", "overall 10%"]  # fmt: skip
    assert op["method"].tolist() == ["dense", "random"]
    tex = (tmp_path / "paper" / "og_ol.tex").read_text()
    assert "\\toprule" in tex and "OP\\_lo" in tex and tex.count("\\\\") == 4  # header + 3 rows
    eff = pd.read_csv(tmp_path / "paper" / "efficiency.csv")
    assert row(eff, model="overall", method="random", budget=0.1)["ttft_speedup"] == pytest.approx(
        math.sqrt(8)
    )

    for quality in ("OP", "OL"):
        plot_pareto(out["pareto"], quality, tmp_path / f"p{quality}.png", tmp_path / f"p{quality}.svg")
        assert (tmp_path / f"p{quality}.png").stat().st_size > 0
    plot_loyalty_heatmap(out["metrics"], tmp_path / "l.png", tmp_path / "l.svg")
    svg = (tmp_path / "l.svg").read_bytes()
    plot_loyalty_heatmap(out["metrics"], tmp_path / "l.png", tmp_path / "l.svg")
    assert (tmp_path / "l.svg").read_bytes() == svg  # deterministic


def test_without_efficiency_records_the_summary_has_empty_oe(jobs, tmp_path: Path) -> None:  # noqa: F811
    out = aggregate(jobs, tmp_path / "tables")
    summary = pd.read_csv(out["summary"])
    assert summary["ttft_speedup"].isna().all()
    assert pd.read_csv(out["pareto"]).empty
    write_paper_tables(out["metrics"], out["summary"], out["efficiency"], tmp_path / "paper")
    plot_pareto(out["pareto"], "OP", tmp_path / "p.png", tmp_path / "p.svg")  # says there is nothing


def test_bad_efficiency_records_name_the_file(records: list[Path], tmp_path: Path) -> None:
    dense = records[0]
    with pytest.raises(EfficiencyError, match=r"m1.*no dense efficiency record"):
        build_efficiency_table(load_efficiency(records[1:3]))
    other = write_record(tmp_path / "other", "m1", "pool", 0.1, 50, 5, settings={"backbone": "model"})
    with pytest.raises(
        EfficiencyError, match=rf"{other}: efficiency settings differ from the dense record's"
    ):
        build_efficiency_table(load_efficiency([*records, other]))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(EfficiencyError, match=rf"{broken}: not a readable efficiency record"):
        load_efficiency([dense, broken])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model": "m1"}))
    with pytest.raises(EfficiencyError, match=rf"{partial}: efficiency record lacks method"):
        load_efficiency([partial])
    with pytest.raises(EfficiencyError, match="missing"):
        load_efficiency([tmp_path / "nowhere.json"])
    assert "\n" not in str(EfficiencyError(f"{partial}: x"))


def test_with_efficiency_refuses_duplicate_rows(records: list[Path]) -> None:
    table = build_efficiency_table(load_efficiency(records))
    summary = table[["model", "method", "budget"]].copy()
    merged = with_efficiency(summary, table)
    assert len(merged) == len(summary)
    with pytest.raises(EfficiencyError, match="duplicate efficiency record"):
        build_efficiency_table(load_efficiency([*records, records[1]]))


def test_latex_escapes_and_marks_missing_values() -> None:
    assert latex_escape("wanda_50 & 10%") == r"wanda\_50 \& 10\%"
    tex = to_latex(pd.DataFrame({"method": ["a_b"], "OP": [math.nan]}), "cap", "tab:x")
    assert r"a\_b & -- \\" in tex and r"\label{tab:x}" in tex and "{lr}" in tex


def test_a_log_of_another_configuration_names_the_file(jobs, tmp_path: Path) -> None:  # noqa: F811
    stray = jobs[5]  # m1/random/0.1/t2
    metrics = json.loads((stray / "metrics.json").read_text())
    metrics["method"] = "pool"
    (stray / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=rf"{stray}/metrics.json: a log of another configuration"):
        aggregate(jobs, tmp_path / "tables")
    assert not (tmp_path / "tables").exists()  # nothing half-written


def test_a_log_of_another_code_version_names_the_file(jobs, tmp_path: Path) -> None:  # noqa: F811
    aggregate(jobs, tmp_path / "tables", code_version="1")  # write_job's logs carry code version "1"
    with pytest.raises(ValueError, match=rf"{jobs[0]}/metrics.json: a log of code version '1', the workflow"):
        aggregate(jobs, tmp_path / "tables2", code_version="2")
