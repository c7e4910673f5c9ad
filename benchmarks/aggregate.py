"""Aggregation of the paper's full grid: how long the aggregate rule takes on logs of realistic size.

The grid is configs/paper.yaml's: every (model, method variant, budget, task) evaluation it plans (3 models x
every method x 3 budgets x 15 tasks, plus the parameter-compression variants) and every (model, variant,
budget) efficiency record. Each job folder gets a metrics.json and a predictions.jsonl with as many samples as
the real benchmark has (``SAMPLES``: DocVQA's 5,349 validation questions, GQA's 12,578 test-dev ones, ...;
``--scale`` shrinks them), answers drawn so that a compressed model agrees with dense on about 85% of the samples
and scores a little lower. Writing the logs is not timed; what is timed is ``effivlm.reporting.aggregate.aggregate``
on them, in this process: reading every log, the ratios, loyalty, the paired bootstrap (1,000 replicates) of
every row and of OP and OL, flips, OE, the Pareto frontiers and writing the tables. Then the paper's tables
(``write_paper_tables``).

Target of the issue: under a minute on 2 cores for the full grid at ``--scale 1``.

Run ``python benchmarks/aggregate.py --help``; ``--quick`` is a seconds-long smoke run (2% of the tasks'
samples on one model) for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effivlm.config import efficiency_file, efficiency_jobs, eval_jobs, job_dir, load_config  # noqa: E402
from effivlm.efficiency.bench import Report, markdown, run_benchmark  # noqa: E402
from effivlm.reporting.aggregate import aggregate  # noqa: E402
from effivlm.reporting.tables import write_paper_tables  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: samples per task in the paper's benchmarks (lmms-eval's splits)
SAMPLES = {
    "docvqa_val": 5349,
    "chartqa": 2500,
    "textvqa_val": 5000,
    "ocrbench": 1000,
    "ai2d": 3088,
    "gqa": 12578,
    "mmmu_val": 900,
    "mme": 2374,
    "mmbench_en_dev": 4329,
    "mmstar": 1500,
    "realworldqa": 765,
    "mathvista_testmini": 1000,
    "llava_wilder_small": 128,
    "mmvet": 218,
    "imagedc": 100,
}
TARGET_S = 60.0
ANSWERS = np.array(["yes", "no", "red", "blue", "2", "3", "the chart shows a rise", "A", "B", "C"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", type=Path, default=REPO / "configs/paper.yaml", help="the grid (default: paper)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="share of each task's samples (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the logs (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    p.add_argument("--quick", action="store_true", help="smoke run: one model, 2%% of the samples")
    args = p.parse_args(argv)
    if args.quick:
        args.scale = min(args.scale, 0.02)
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    return args


def write_logs(cfg: dict[str, Any], args: argparse.Namespace) -> tuple[list[Path], list[Path], int]:
    """Every evaluation's job folder and every efficiency record; returns them and the number of samples."""
    rng = np.random.default_rng(args.seed)
    dense_answers: dict[tuple[str, str], np.ndarray] = {}
    dirs, samples = [], 0
    for job in eval_jobs(cfg):
        n = max(1, round(SAMPLES.get(job.task, 1000) * args.scale))
        key = (job.model, job.task)
        if key not in dense_answers:
            dense_answers[key] = rng.integers(0, len(ANSWERS), n)
        answers = dense_answers[key].copy()
        if job.variant != "dense":
            changed = rng.random(n) < 0.15  # about 85% loyal
            answers[changed] = rng.integers(0, len(ANSWERS), int(changed.sum()))
        scores = (answers % 3 != 0).astype(float)  # a deterministic "right" per answer
        folder = Path(job_dir(cfg, job))
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"doc_id": i, "target": "t", "prediction": str(ANSWERS[a]), "score": s})
            for i, (a, s) in enumerate(zip(answers, scores, strict=True))
        ]
        (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
        method = cfg["methods"][job.variant]
        metrics = {
            "model": job.model,
            "family": cfg["models"][job.model]["family"],
            "method": job.variant,
            "method_name": method["method"],
            "method_params": method["params"],
            "budget": job.budget,
            "task": job.task,
            "metric": "exact_match",
            "score": float(scores.mean()),
            "n": n,
            "code_version": "bench",
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
        dirs.append(folder)
        samples += n
    records = []
    for model, variant, budget in efficiency_jobs(cfg):
        path = Path(efficiency_file(cfg, model, variant, budget))
        path.parent.mkdir(parents=True, exist_ok=True)
        speed = 1.0 if variant == "dense" else 1.0 / max(float(budget), 0.2)
        timing = {"median": 100 / speed, "q1": 95 / speed, "q3": 105 / speed, "min": 90 / speed, "max": 110}
        record = {
            "model": model,
            "method": variant,
            "method_name": cfg["methods"][variant]["method"],
            "budget": float(budget),
            "settings": {"backbone": "model"},
            "ttft": timing,
            "decode": {k: v / 10 for k, v in timing.items()},
            "tokens_per_s": speed * 100,
            "peak_memory_bytes": 10**9,
            "kv_bytes": 1000 * float(budget),
            "kv_bytes_dense": 1000,
            "prefill_flops": 1e12 * float(budget),
            "decode_flops": 1e10,
        }
        path.write_text(json.dumps(record))
        records.append(path)
    return dirs, records, samples


def run(args: argparse.Namespace) -> Report:
    cfg = load_config(args.config)
    if args.quick:
        first = next(iter(cfg["models"]))
        cfg["models"] = {first: cfg["models"][first]}
        cfg["efficiency"]["models"] = [first]
        for spec in cfg["methods"].values():
            spec["models"] = [m for m in spec["models"] if m == first]
    with tempfile.TemporaryDirectory(prefix="effivlm-aggregate-") as tmp:
        cfg["results"] = str(args.work or Path(tmp))
        started = time.perf_counter()
        dirs, records, samples = write_logs(cfg, args)
        written_s = time.perf_counter() - started
        tables = Path(cfg["results"]) / "tables"
        started = time.perf_counter()
        out = aggregate(dirs, tables, efficiency_files=records, code_version="bench")
        aggregate_s = time.perf_counter() - started
        started = time.perf_counter()
        write_paper_tables(out["metrics"], out["summary"], out["efficiency"], tables / "paper")
        paper_s = time.perf_counter() - started
        rows_metrics = len(out["metrics"].read_text().splitlines()) - 1
    total = aggregate_s + paper_s
    row = {
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "models": len(cfg["models"]),
        "evaluations": len(dirs),
        "efficiency_records": len(records),
        "samples": samples,
        "metrics_rows": rows_metrics,
        "write_logs_s": written_s,
        "aggregate_s": aggregate_s,
        "paper_tables_s": paper_s,
        "total_s": total,
        "cpus": len(os.sched_getaffinity(0)),
    }
    target = {
        "target": f"aggregation of the full grid < {TARGET_S:.0f} s",
        "value_s": total,
        "met": total < TARGET_S,
    }
    lines = [
        "# Aggregation of the paper's grid",
        "",
        f"{row['evaluations']} evaluations ({row['samples']:,} logged samples at scale {args.scale:g}) and "
        f"{row['efficiency_records']} efficiency records of {row['models']} models, {row['cpus']} CPUs.",
        "",
        *markdown(
            ["step", "seconds"],
            [
                ["write the synthetic logs (not timed)", f"{written_s:.1f}"],
                ["aggregate: metrics, bootstrap, summary, OE, Pareto", f"{aggregate_s:.1f}"],
                ["paper tables (CSV, Markdown, LaTeX)", f"{paper_s:.1f}"],
                ["total (timed)", f"{total:.1f}"],
            ],
        ),
        "",
        f"Target: {target['target']}: {'met' if target['met'] else 'NOT met'} ({total:.1f} s)"
        + ("" if args.scale == 1 else f" (at scale {args.scale:g}, not the full logs)"),
    ]
    return Report(lines=lines, rows=[row], targets=[target], setup={"scale": args.scale, "seed": args.seed})


def main(argv: Sequence[str] | None = None) -> Report:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    main()
