"""Tables and figures from hand-made job folders with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from effivlm.metrics import loyalty_replicates, overall_performance_interval, ratio_replicates
from effivlm.metrics.stats import derive_seed
from effivlm.reporting.aggregate import (
    aggregate,
    build_metrics_table,
    build_summary_table,
    build_tables,
    load_job,
    summary_markdown,
)
from effivlm.reporting.figures import plot_retained, plot_task_ratios


def write_job(
    root: Path,
    model: str,
    method: str,
    budget: float,
    task: str,
    score: float,
    predictions: list[str],
    *,
    visual_tokens: dict[str, int] | None = None,
    scores: list[float] | None = None,
) -> Path:
    """A job folder; per-sample scores default to the job score (so their mean is the job score)."""
    job = root / model / method / str(budget) / task
    job.mkdir(parents=True)
    metrics = {
        "model": model,
        "family": "qwen2_vl",
        "method": method,
        "method_name": method,
        "method_params": {"seed": 0} if method != "dense" else {},
        "budget": budget,
        "task": task,
        "metric": "exact_match",
        "score": score,
        "n": len(predictions),
        "effivlm_version": "0.1.0",
        "code_version": "1",
    }
    if visual_tokens is not None:
        metrics["visual_tokens"] = visual_tokens
    (job / "metrics.json").write_text(json.dumps(metrics))
    lines = [
        json.dumps(
            {
                "doc_id": i,
                "target": "red",
                "prediction": p,
                "score": score if scores is None else scores[i],
                "extra": [i],
            }
        )
        for i, p in enumerate(predictions)
    ]
    (job / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return job


DENSE_T1 = ["red", "blue", "green", "red"]
DENSE_T2 = ["square", "circle"]


@pytest.fixture
def jobs(tmp_path: Path) -> list[Path]:
    """Two models, two tasks, dense plus 'random' at 0.1 and 0.4, with hand-picked scores.

    m1 @ 0.1: t1 0.4/0.8 = 0.5, t2 0.5/0.5 = 1.0; loyalty t1 3/4 (case/punctuation differences count as equal)
    m2 @ 0.1: t1 0.5/1.0 = 0.5, t2 0.25/0.5 = 0.5; loyalty t1 1.0, t2 1/2
    @ 0.4 everything equals dense.
    """
    root = tmp_path / "jobs"
    vt = {"total": 3200, "kept": 400}
    return [
        write_job(root, "m1", "dense", 1.0, "t1", 0.8, DENSE_T1),
        write_job(root, "m1", "dense", 1.0, "t2", 0.5, DENSE_T2),
        write_job(root, "m2", "dense", 1.0, "t1", 1.0, DENSE_T1),
        write_job(root, "m2", "dense", 1.0, "t2", 0.5, DENSE_T2),
        write_job(root, "m1", "random", 0.1, "t1", 0.4, ["Red.", "BLUE", "red", " red "], visual_tokens=vt),
        write_job(root, "m1", "random", 0.1, "t2", 0.5, DENSE_T2, visual_tokens=vt),
        write_job(root, "m2", "random", 0.1, "t1", 0.5, DENSE_T1, visual_tokens=vt),
        write_job(root, "m2", "random", 0.1, "t2", 0.25, ["square", "triangle"], visual_tokens=vt),
        write_job(root, "m1", "random", 0.4, "t1", 0.8, DENSE_T1),
        write_job(root, "m1", "random", 0.4, "t2", 0.5, DENSE_T2),
        write_job(root, "m2", "random", 0.4, "t1", 1.0, DENSE_T1),
        write_job(root, "m2", "random", 0.4, "t2", 0.5, DENSE_T2),
    ]


def row(df: pd.DataFrame, **key: object) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for col, value in key.items():
        mask &= df[col] == value
    assert mask.sum() == 1, key
    return df[mask].iloc[0]


def test_load_job_reads_both_files(jobs: list[Path]) -> None:
    metrics, preds = load_job(jobs[4])
    assert metrics["method"] == "random" and metrics["budget"] == 0.1
    assert list(preds["doc_id"]) == [0, 1, 2, 3]
    assert {"target", "prediction", "score", "extra"} <= set(preds.columns)


def test_metrics_table_ratios_and_loyalty(jobs: list[Path]) -> None:
    table = build_metrics_table(jobs)
    assert len(table) == 12
    expected_cols = {"model", "family", "method", "method_name", "budget", "task", "metric", "score"}
    expected_cols |= {"dense_score", "ratio", "loyalty", "n", "visual_kept_share"}
    assert expected_cols <= set(table.columns)
    r = row(table, model="m1", method="random", budget=0.1, task="t1")
    assert r["dense_score"] == 0.8 and r["ratio"] == pytest.approx(0.5) and r["loyalty"] == 0.75
    assert r["visual_kept_share"] == pytest.approx(400 / 3200) and r["n"] == 4
    r = row(table, model="m2", method="random", budget=0.1, task="t2")
    assert r["ratio"] == pytest.approx(0.5) and r["loyalty"] == 0.5
    assert math.isnan(row(table, model="m1", method="random", budget=0.4, task="t1")["visual_kept_share"])
    # sorted by model, method, budget, task
    keys = list(table[["model", "method", "budget", "task"]].itertuples(index=False, name=None))
    assert keys == sorted(keys)


def test_dense_rows_are_exactly_one(jobs: list[Path]) -> None:
    dense = build_metrics_table(jobs).query("method == 'dense'")
    assert len(dense) == 4
    assert (dense["ratio"] == 1.0).all() and (dense["loyalty"] == 1.0).all()


def test_summary_per_model_and_overall(jobs: list[Path]) -> None:
    summary = build_summary_table(build_metrics_table(jobs))
    m1 = row(summary, model="m1", method="random", budget=0.1)
    assert m1["OP"] == pytest.approx(math.sqrt((0.5**2 + 1.0**2) / 2))
    assert m1["OL"] == pytest.approx(100 * (0.75 + 1.0) / 2)
    assert m1["mean_score"] == pytest.approx((0.4 + 0.5) / 2) and m1["n_tasks"] == 2
    assert row(summary, model="m2", method="random", budget=0.1)["OP"] == pytest.approx(0.5)

    overall = row(summary, model="overall", method="random", budget=0.1)
    assert overall["OP"] == pytest.approx(math.sqrt((0.25 + 1.0 + 0.25 + 0.25) / 4))
    assert overall["OL"] == pytest.approx(100 * (0.75 + 1.0 + 1.0 + 0.5) / 4)
    # model-averaged ratios: t1 (0.5 + 0.5) / 2 = 0.5, t2 (1.0 + 0.5) / 2 = 0.75 -> std 0.125 / mean 0.625
    assert overall["OG"] == pytest.approx(100 * 0.125 / 0.625)
    assert overall["n_models"] == 2

    dense = row(summary, model="overall", method="dense", budget=1.0)
    assert dense["OP"] == 1.0 and dense["OL"] == 100.0 and dense["OG"] == 0.0
    assert list(summary["model"].iloc[-3:]) == ["overall"] * 3


def test_missing_dense_names_model_task_and_folder(jobs: list[Path]) -> None:
    without = [j for j in jobs if not (j.parts[-4:-2] == ("m2", "dense") and j.name == "t2")]
    expected = str(jobs[0].parents[3] / "m2" / "dense" / "1.0" / "t2")
    with pytest.raises(ValueError, match="model 'm2' and task 't2'") as err:
        build_metrics_table(without)
    assert expected in str(err.value)


def test_empty_predictions_name_the_file(jobs: list[Path]) -> None:
    (jobs[4] / "predictions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no samples") as err:
        build_metrics_table(jobs)
    assert str(jobs[4] / "predictions.jsonl") in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metrics.json", "{not json", "not valid JSON"),
        ("metrics.json", '{"model": "m1"}', "missing key"),
        (
            "predictions.jsonl",
            '{"doc_id": 0, "prediction": "red"}\n{broken\n',
            r"predictions.jsonl:2: not valid JSON",
        ),
        ("predictions.jsonl", '{"doc_id": 0}\n', "missing key.*prediction"),
    ],
)
def test_corrupt_files_name_the_file(jobs: list[Path], name: str, content: str, message: str) -> None:
    (jobs[4] / name).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_job(jobs[4])
    assert str(jobs[4] / name) in str(err.value)


def test_missing_metrics_and_truncated_log(jobs: list[Path]) -> None:
    (jobs[5] / "metrics.json").unlink()
    with pytest.raises(ValueError, match="metrics.json: missing"):
        load_job(jobs[5])
    (jobs[4] / "predictions.jsonl").write_text(json.dumps({"doc_id": 0, "prediction": "red"}) + "\n")
    with pytest.raises(ValueError, match="1 samples, but metrics.json says n=4"):
        load_job(jobs[4])


def test_doc_id_mismatch_names_the_job(tmp_path: Path) -> None:
    dense = write_job(tmp_path, "m", "dense", 1.0, "t", 1.0, ["a", "b", "c"])
    short = write_job(tmp_path, "m", "fastv", 0.1, "t", 1.0, ["a", "b"])
    with pytest.raises(ValueError, match="missing from the compressed predictions: 2") as err:
        build_metrics_table([dense, short])
    assert str(short) in str(err.value)


def test_duplicate_jobs_are_refused(jobs: list[Path]) -> None:
    with pytest.raises(ValueError, match="duplicate job"):
        build_metrics_table([*jobs, jobs[0]])


def test_zero_dense_score_gives_nan_ratio_with_a_note(tmp_path: Path) -> None:
    jobs = [
        write_job(tmp_path, "m", "dense", 1.0, "t", 0.0, ["a"]),
        write_job(tmp_path, "m", "dense", 1.0, "u", 0.5, ["a"]),
        write_job(tmp_path, "m", "h2o", 0.1, "t", 0.0, ["a"]),
        write_job(tmp_path, "m", "h2o", 0.1, "u", 0.25, ["b"]),
    ]
    table = build_metrics_table(jobs)
    r = row(table, method="h2o", task="t")
    assert math.isnan(r["ratio"]) and "dense score is 0" in r["note"]
    s = row(build_summary_table(table), model="m", method="h2o")
    assert s["OP"] == pytest.approx(0.5) and s["n_ratio_undefined"] == 1 and "m/t" in s["note"]


def test_aggregate_writes_tables_atomically_and_deterministically(jobs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "tables"
    paths = aggregate(jobs, out)
    assert set(paths) == {"metrics", "summary", "summary_md", "efficiency", "pareto"}
    names = ["efficiency.csv", "metrics.csv", "pareto.csv", "summary.csv", "summary.md"]
    assert sorted(p.name for p in out.iterdir()) == names
    first = {k: p.read_bytes() for k, p in paths.items()}
    aggregate(list(reversed(jobs)), out)
    assert {k: p.read_bytes() for k, p in paths.items()} == first

    metrics = pd.read_csv(paths["metrics"])
    assert len(metrics) == 12
    md = paths["summary_md"].read_text()
    assert md.startswith("| model | method | budget |")
    op = f"{math.sqrt(0.625):.3f}"
    assert f"| m1 | random | 0.100 | 2 | 0.450 | {op} [{op}, {op}] |" in md
    assert md.strip().splitlines()[-1].startswith("| overall | random | 0.400 |")


def test_figures_are_written_and_deterministic(jobs: list[Path], tmp_path: Path) -> None:
    metrics_csv = aggregate(jobs, tmp_path / "tables")["metrics"]
    for plot in (plot_retained, plot_task_ratios):
        a_png, a_svg = tmp_path / f"{plot.__name__}_a.png", tmp_path / f"{plot.__name__}_a.svg"
        b_png, b_svg = tmp_path / f"{plot.__name__}_b.png", tmp_path / f"{plot.__name__}_b.svg"
        plot(metrics_csv, a_png, a_svg)
        plot(metrics_csv, b_png, b_svg)
        assert a_png.stat().st_size > 1000 and a_svg.stat().st_size > 1000
        assert a_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert a_svg.read_bytes() == b_svg.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_figures_refuse_a_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics.csv: missing"):
        plot_retained(tmp_path / "metrics.csv", tmp_path / "a.png", tmp_path / "a.svg")


def test_intervals_and_flips_in_the_metrics_table(jobs: list[Path]) -> None:
    table = build_metrics_table(jobs)
    assert {"ratio_lo", "ratio_hi", "loyalty_lo", "loyalty_hi", "flips_lost", "flips_gained"} <= set(table)
    dense = table.query("method == 'dense'")
    assert (dense["ratio_lo"] == 1.0).all() and (dense["ratio_hi"] == 1.0).all()
    assert (dense["loyalty_lo"] == 1.0).all() and (dense["loyalty_hi"] == 1.0).all()
    assert (dense["flips_lost"] == 0).all() and (dense["flips_gained"] == 0).all()
    # per-sample scores are the job score: 0.4 (wrong) against dense 0.8 (right) on all 4 samples
    r = row(table, model="m1", method="random", budget=0.1, task="t1")
    assert r["ratio_lo"] == pytest.approx(0.5) and r["ratio_hi"] == pytest.approx(0.5)
    assert r["flips_lost"] == 4 and r["flips_gained"] == 0 and r["note"] == ""
    assert 0 <= r["loyalty_lo"] <= 0.75 <= r["loyalty_hi"] <= 1


def test_binary_scores_give_hand_counted_flips_and_paired_intervals(tmp_path: Path) -> None:
    dense_scores = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    comp_scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    preds = [f"a{i}" for i in range(8)]
    comp_preds = [p if s == d else "other" for p, s, d in zip(preds, comp_scores, dense_scores, strict=True)]
    jobs = [
        write_job(tmp_path, "m", "dense", 1.0, "t", 0.75, preds, scores=dense_scores),
        write_job(tmp_path, "m", "h2o", 0.1, "t", 0.625, comp_preds, scores=comp_scores),
        write_job(tmp_path, "m", "dense", 1.0, "u", 1.0, ["x", "y"], scores=[1.0, 1.0]),
        write_job(tmp_path, "m", "h2o", 0.1, "u", 0.5, ["x", "y"], scores=[1.0, 0.0]),
    ]
    metrics, summary = build_tables(jobs, n_boot=400)
    r = row(metrics, method="h2o", task="t")
    assert (r["flips_lost"], r["flips_gained"]) == (2, 1)
    assert r["loyalty"] == 5 / 8 and r["ratio"] == pytest.approx(0.625 / 0.75)
    assert r["ratio_lo"] < r["ratio"] < r["ratio_hi"]
    assert r["loyalty_lo"] < r["loyalty"] < r["loyalty_hi"]

    # OP interval: the tasks' replicates (each task with its own derived seed) recombined per replicate
    reps = np.column_stack(
        [
            ratio_replicates(np.array(comp_scores), np.array(dense_scores), 400, derive_seed(0, "t")),
            ratio_replicates(np.array([1.0, 0.0]), np.array([1.0, 1.0]), 400, derive_seed(0, "u")),
        ]
    )
    s = row(summary, model="m", method="h2o")
    assert not np.isnan(reps).any()
    assert (s["OP_lo"], s["OP_hi"]) == pytest.approx(overall_performance_interval(reps))
    assert s["OP_lo"] < s["OP"] < s["OP_hi"]
    agree = np.array(comp_preds) == np.array(preds)
    ol_reps = loyalty_replicates(agree, 400, derive_seed(0, "t"))  # task u: identical answers
    assert s["OL_lo"] <= s["OL"] <= s["OL_hi"] and s["OL_hi"] <= 100
    assert s["OL_lo"] == pytest.approx(np.percentile(100 * (ol_reps + 1.0) / 2, 2.5))
    overall = row(summary, model="overall", method="h2o")
    assert (overall["OL_lo"], overall["OL_hi"]) == (s["OL_lo"], s["OL_hi"])  # one model: same replicates
    d = row(summary, model="overall", method="dense")
    assert (d["OP_lo"], d["OP_hi"], d["OL_lo"], d["OL_hi"]) == (1.0, 1.0, 100.0, 100.0)


def test_missing_sample_scores_leave_ratio_interval_and_flips_undefined(tmp_path: Path) -> None:
    dense = write_job(tmp_path, "m", "dense", 1.0, "t", 1.0, ["a", "b", "c"])
    comp = write_job(tmp_path, "m", "fastv", 0.1, "t", 0.5, ["a", "b", "x"])
    lines = [json.dumps({"doc_id": i, "prediction": p}) for i, p in enumerate(["a", "b", "x"])]
    (comp / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    r = row(build_metrics_table([dense, comp]), method="fastv")
    assert math.isnan(r["ratio_lo"]) and math.isnan(r["ratio_hi"])
    assert pd.isna(r["flips_lost"]) and pd.isna(r["flips_gained"])
    assert r["loyalty_lo"] <= 2 / 3 <= r["loyalty_hi"] and "per-sample scores missing" in r["note"]


def test_score_not_a_sample_mean_is_noted(tmp_path: Path) -> None:
    dense = write_job(tmp_path, "m", "dense", 1.0, "t", 1500.0, ["a", "b"], scores=[1.0, 1.0])
    comp = write_job(tmp_path, "m", "fastv", 0.1, "t", 750.0, ["a", "x"], scores=[1.0, 0.0])
    r = row(build_metrics_table([dense, comp]), method="fastv")
    assert r["ratio"] == 0.5 and "not their mean" not in r["note"]
    comp2 = write_job(tmp_path / "b", "m", "fastv", 0.1, "t", 300.0, ["a", "x"], scores=[1.0, 0.0])
    r = row(build_metrics_table([dense, comp2]), method="fastv")
    assert "not their mean" in r["note"]


def test_summary_without_replicates_has_nan_intervals(jobs: list[Path]) -> None:
    summary = build_summary_table(build_metrics_table(jobs))
    assert summary[["OP_lo", "OP_hi", "OL_lo", "OL_hi"]].isna().all().all()
    md = summary_markdown(summary)
    assert "| 1.000 [n/a] |" in md
    plain = summary_markdown(summary.drop(columns=["OP_lo", "OP_hi", "OL_lo", "OL_hi"]))
    assert "[" not in plain


def test_summary_csv_and_md_carry_intervals(jobs: list[Path], tmp_path: Path) -> None:
    paths = aggregate(jobs, tmp_path / "tables")
    summary = pd.read_csv(paths["summary"])
    assert {"OP_lo", "OP_hi", "OL_lo", "OL_hi"} <= set(summary.columns)
    overall = row(summary, model="overall", method="random", budget=0.1)
    assert overall["OP_lo"] <= overall["OP"] <= overall["OP_hi"]
    assert overall["OL_lo"] <= overall["OL"] <= overall["OL_hi"] <= 100
    md = paths["summary_md"].read_text()
    assert "| 100.000 [100.000, 100.000] |" in md
    metrics = pd.read_csv(paths["metrics"])
    assert {"ratio_lo", "ratio_hi", "loyalty_lo", "loyalty_hi", "flips_lost", "flips_gained"} <= set(metrics)


def test_methods_losing_to_pooling_show_a_negative_margin() -> None:
    rows = []
    for model in ("m1", "m2"):
        for task in ("t1", "t2"):
            rows.append({"model": model, "method": "dense", "budget": 1.0, "task": task, "ratio": 1.0})
            rows.append({"model": model, "method": "pool", "budget": 0.1, "task": task, "ratio": 0.8})
            rows.append({"model": model, "method": "fastv", "budget": 0.1, "task": task, "ratio": 0.6})
            rows.append({"model": model, "method": "fastv", "budget": 0.4, "task": task, "ratio": 0.9})
    metrics = pd.DataFrame(rows).assign(score=lambda d: d["ratio"], loyalty=1.0)
    summary = build_summary_table(metrics)
    assert row(summary, model="m1", method="fastv", budget=0.1)["OP_vs_baseline"] == pytest.approx(0.6 - 0.8)
    assert row(summary, model="overall", method="fastv", budget=0.1)["OP_vs_baseline"] == pytest.approx(-0.2)
    assert row(summary, model="m2", method="pool", budget=0.1)["OP_vs_baseline"] == 0.0
    assert math.isnan(
        row(summary, model="m1", method="fastv", budget=0.4)["OP_vs_baseline"]
    )  # no pool at 0.4
    assert row(summary, model="m1", method="fastv", budget=0.1)["baseline"] == "pool"
    assert "| OP - baseline |" in summary_markdown(summary) and "-0.200" in summary_markdown(summary)


def test_kv_methods_are_measured_against_random_eviction_and_report_the_cache_they_keep() -> None:
    rows = []
    for task in ("t1", "t2"):
        rows.append({"model": "m", "method": "dense", "budget": 1.0, "task": task, "ratio": 1.0})
        rows.append({"model": "m", "method": "pool", "budget": 0.1, "task": task, "ratio": 0.9})
        rows.append(
            {
                "model": "m",
                "method": "rkv",
                "method_name": "random_kv",
                "budget": 0.1,
                "task": task,
                "ratio": 0.5,
            }
        )
        rows.append(
            {
                "model": "m",
                "method": "snapkv",
                "budget": 0.1,
                "task": task,
                "ratio": 0.7,
                "kv_kept_share": 0.1,
            }
        )
    metrics = pd.DataFrame(rows).assign(score=lambda d: d["ratio"], loyalty=1.0)
    metrics["method_name"] = metrics["method_name"].fillna(metrics["method"])
    summary = build_summary_table(metrics)
    snap = row(summary, model="m", method="snapkv", budget=0.1)
    assert snap["baseline"] == "random_kv"
    assert snap["OP_vs_baseline"] == pytest.approx(0.7 - 0.5)  # not against pooling's 0.9
    assert snap["kv_kept_share"] == pytest.approx(0.1)
    assert row(summary, model="m", method="dense", budget=1.0)["baseline"] == ""
    assert "| KV kept |" in summary_markdown(summary)


def test_kv_kept_share_comes_from_the_jobs_cache_bytes(tmp_path: Path) -> None:
    dense = write_job(tmp_path, "m", "dense", 1.0, "t", 1.0, ["a", "b"])
    comp = write_job(tmp_path, "m", "snapkv", 0.1, "t", 1.0, ["a", "b"])
    metrics_file = comp / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["kv_cache"] = {"dense_bytes": 4000, "bytes": 400}
    metrics_file.write_text(json.dumps(metrics))
    r = row(build_metrics_table([dense, comp]), method="snapkv")
    assert r["kv_kept_share"] == pytest.approx(0.1)
    assert math.isnan(row(build_metrics_table([dense, comp]), method="dense")["kv_kept_share"])


# Logs that the fast readers must not read differently from the line-by-line one: predictions that pyarrow
# would type as dates or numbers, string doc ids, scores of mixed types, a judge's dict as a score.
AWKWARD_LOGS = {
    "dates-and-numbers": [
        {"doc_id": 0, "prediction": "2021-01-01", "score": 1.0},
        {"doc_id": 1, "prediction": 7, "score": 0.0},
        {"doc_id": 2, "prediction": "  Red. ", "score": 1.0},
    ],
    "all-dates": [
        {"doc_id": 0, "prediction": "2021-01-01", "score": 1.0},
        {"doc_id": 1, "prediction": "2021-01-02", "score": 0.0},
        {"doc_id": 2, "prediction": "1999-12-31", "score": 1.0},
    ],
    "all-numbers": [
        {"doc_id": 0, "prediction": 7, "score": 1.0},
        {"doc_id": 1, "prediction": 8, "score": 0.0},
        {"doc_id": 2, "prediction": 9.5, "score": 1.0},
    ],
    "string-doc-ids": [
        {"doc_id": "q-2", "prediction": "A", "score": True},
        {"doc_id": "q-10", "prediction": "b", "score": False},
        {"doc_id": "q-1", "prediction": "(C)", "score": True},
    ],
    "mixed-scores": [
        {"doc_id": 0, "prediction": "yes", "score": 1},
        {"doc_id": 1, "prediction": "no", "score": 0.5},
        {"doc_id": 2, "prediction": "yes", "score": {"judge": 3}},
    ],
}


@pytest.mark.parametrize("name", AWKWARD_LOGS)
def test_every_reader_gives_the_table_of_the_checked_one(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from effivlm.reporting import aggregate as agg

    records = AWKWARD_LOGS[name]
    folders = []
    for method, flip in (("dense", False), ("random", True)):
        folder = write_job(tmp_path, "m", method, 1.0 if method == "dense" else 0.1, "t", 0.5, ["x"] * 3)
        lines = [
            {**r, "prediction": "other" if flip and i == 0 else r["prediction"]}
            for i, r in enumerate(records)
        ]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        folders.append(folder)

    def table(pyarrow: bool, fast: bool) -> pd.DataFrame:
        monkeypatch.setattr(agg, "_PYARROW", pyarrow)
        if not fast:
            monkeypatch.setattr(agg, "_read_predictions_fast", lambda path: None)
        metrics = build_metrics_table(folders).drop(columns=["job_dir"])
        monkeypatch.undo()
        return metrics

    checked = table(pyarrow=False, fast=False)
    row = checked[checked["method"] == "random"].iloc[0]
    assert row["loyalty"] == pytest.approx(2 / 3)  # the first answer changed; "  Red. " equals itself
    for pyarrow in (True, False):
        pd.testing.assert_frame_equal(table(pyarrow=pyarrow, fast=True), checked, check_exact=True)
    # what the first reader parsed is text as the log wrote it, never a date or a number
    monkeypatch.setattr(agg, "_PYARROW", True)
    _, predictions = load_job(folders[0])
    assert [agg._as_text(v) for v in predictions["prediction"]] == [
        agg._as_text(r["prediction"]) for r in records
    ]
