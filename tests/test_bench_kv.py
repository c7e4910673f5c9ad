"""The KV-cache benchmark runs end to end on a tiny model and prints a row per method and budget."""

from __future__ import annotations

import json
import statistics

import pytest
from helpers import load_benchmark, table_rows

from effivlm.methods import build_method
from effivlm.methods.base import kv_capacity

METHODS = ["streamingllm", "random_kv", "h2o", "snapkv", "pyramidkv", "vlcache", "lookm"]
BUDGETS = ["0.01", "0.1", "0.4"]
UNIFORM = {"streamingllm", "random_kv", "h2o", "snapkv", "lookm"}  # the same capacity in every layer


def test_quick_run_prints_every_method_and_budget(capsys, tmp_path):
    bench = load_benchmark("kv_cache")
    report = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "kv")])
    out = capsys.readouterr().out

    printed = table_rows(out, "## Per method and budget")
    assert [(r[0], r[1]) for r in printed] == [("dense", "1")] + [(m, b) for m in METHODS for b in BUDGETS]
    for cells in printed:
        _, _, entries, mib, ratio, ttft, ttft_spread, ttft_x, decode, decode_spread, decode_x = cells
        assert float(entries) > 0 and float(mib) >= 0 and 0 < float(ratio) <= 1
        for median, spread in ((ttft, ttft_spread), (decode, decode_spread)):
            low, high = (float(x) for x in spread.split("-"))
            assert 0 < low <= float(median) <= high
        assert float(ttft_x) > 0 and float(decode_x) > 0
    assert printed[0][4] == "1.0000" and printed[0][7] == printed[0][10] == "1.00"

    # the bytes kept are the entries kept: budget * L per layer (L = 200 makes every default budget whole)
    rows = report.rows
    length = rows[0]["prompt_tokens"]
    assert length == 200
    layers = len(rows[0]["kv_tokens"])
    assert rows[0]["kv_tokens"] == [length] * layers and rows[0]["kv_bytes"] == rows[0]["kv_bytes_dense"]
    for row, cells in zip(rows[1:], printed[1:], strict=True):
        method, budget, kept = row["method"], row["budget"], row["kv_tokens"]
        capacity = kv_capacity(budget, length)
        if method in UNIFORM:
            assert kept == [capacity] * layers
        elif method == "pyramidkv":
            assert kept == build_method(method, budget).layer_capacities(length, layers, None)
        else:  # VL-Cache moves entries between layers, keeping the total
            assert sum(kept) == capacity * layers
        assert row["kv_bytes_dense"] == rows[0]["kv_bytes_dense"] and row["prompt_tokens"] == length
        assert row["kv_ratio"] == pytest.approx(statistics.fmean(kept) / length)
        assert row["kv_ratio"] == pytest.approx(budget, rel=0.02)
        assert float(cells[4]) == pytest.approx(row["kv_ratio"], abs=5e-5)
        assert row["new_tokens"] == report.setup["decode_steps"] + 2

    # the direct price: scoring only where the method probes attention; every compression takes time; the
    # price is their sum in each run and sets the direct TTFT ratio against dense
    prices = table_rows(out, "## Direct price")
    assert [(r[0], r[1]) for r in prices] == [(m, b) for m in METHODS for b in BUDGETS]
    dense_ms = rows[0]["ttft_ms"]
    for row, cells in zip(rows[1:], prices, strict=True):
        probes = build_method(row["method"]).query_rows != "none"
        assert (row["probed_calls"] > 0) == probes  # a replaced attention call may even make scoring cheaper
        assert probes or row["scoring_ms"] == 0
        assert row["compress_ms"] > 0 and len(row["price_times_ms"]) == report.setup["repeats"]
        assert row["price_min_ms"] <= row["price_ms"] <= row["price_max_ms"]
        assert row["ttft_speedup_direct"] == pytest.approx(dense_ms / (dense_ms + row["price_ms"]))
        assert float(cells[8]) == pytest.approx(row["ttft_speedup_direct"], abs=5e-3)
    assert rows[0]["price_ms"] == 0 and rows[0]["ttft_speedup_direct"] == 1

    targets = table_rows(out, "## Targets of the issue")
    assert [t[0][:4] for t in targets] == ["(a) ", "(b) ", "(c) ", "(a')"]
    assert targets[1][2] == "PASS"  # every cache is at its budget
    assert targets[2][2] == "n/a (not measured)"  # the quick prompt is far below 4,000 tokens
    direct_worst = min(r["ttft_speedup_direct"] for r in rows[1:])
    assert float(targets[3][1]) == pytest.approx(direct_worst, abs=5e-4)

    # the files hold the same rows
    saved = json.loads((tmp_path / "kv.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report.rows))
    assert [t["met"] for t in saved["targets"]] == [t["met"] for t in report.targets]
    markdown = (tmp_path / "kv.md").read_text()
    assert table_rows(markdown, "## Per method and budget") == printed
    assert table_rows(markdown, "## Targets of the issue") == targets


@pytest.mark.parametrize(
    ("flags", "shape"),
    [
        ([], (1024, 2, 16, 16, 2816)),
        (["--preset", "7b"], (3584, 28, 28, 4, 18944)),
        (["--preset", "mha7b"], (4096, 1, 32, 32, 11008)),
        (["--preset", "mha7b", "--layers", "32"], (4096, 32, 32, 32, 11008)),
        (["--preset", "mha7b", "--kv-heads", "8"], (4096, 1, 32, 8, 11008)),
    ],
)
def test_presets_resolve_to_their_decoder_shapes(flags, shape):
    bench = load_benchmark("kv_cache")
    s = bench.parse_args(["--device", "cpu", *flags]).sizes
    assert (s.text_hidden, s.text_layers, s.text_heads, s.text_kv_heads, s.text_intermediate) == shape
