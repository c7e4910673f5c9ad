"""The prefill benchmark runs end to end on a tiny model and prints a row per method and budget."""

from __future__ import annotations

import json
import re

from helpers import load_benchmark, table_rows

METHODS = ["random", "pool", "fastv", "visionzip", "prumerge_plus"]
BUDGETS = ["0.01", "0.1", "0.4"]


def test_quick_run_prints_every_method_and_budget(capsys, tmp_path):
    bench = load_benchmark("token_prefill")
    report = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "prefill")])
    out = capsys.readouterr().out

    speed = table_rows(out, "## Speedup per method and budget")
    assert [(r[0], r[1]) for r in speed] == [("dense", "1")] + [(m, b) for m in METHODS for b in BUDGETS]
    for method, _, kept, median, spread, measured, theory, ratio in speed:
        assert re.fullmatch(r"\d+/16", kept)
        low, high = (float(x) for x in spread.split("-"))
        assert 0 < low <= float(median) <= high
        assert float(measured) > 0 and float(ratio) > 0
        assert float(theory) >= 1.0 if method != "dense" else float(theory) == 1.0

    overhead = table_rows(out, "## Scoring overhead")
    assert [r[0] for r in overhead] == METHODS
    calls = {r[0]: int(r[1]) for r in overhead}
    assert calls["random"] == calls["pool"] == 0  # nothing probed: no price
    assert calls["fastv"] == 1 and calls["visionzip"] >= 1 and calls["prumerge_plus"] >= 1
    for method, _, callback, replaced, price, *_ in overhead:
        assert float(callback) > 0 if calls[method] else float(callback) == float(price) == 0
        assert abs(float(price) - (float(callback) - float(replaced))) <= 0.11  # rounded to 0.1 ms
    assert all(float(r[7]) > 0 for r in overhead)  # TTFT at 1.0
    assert len(table_rows(out, "## Targets of the issue")) == 3

    # visual tokens kept are the budget's (16 tokens: ceil(0.4 * 16) = 7), and the files hold the same rows
    assert {(r["method"], r["budget"]): r["visual_kept"] for r in report.speed}[("visionzip", 0.4)] == 7
    assert json.loads((tmp_path / "prefill.json").read_text())["speed"] == report.speed
    assert "## Speedup per method and budget" in (tmp_path / "prefill.md").read_text()
