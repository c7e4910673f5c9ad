"""The Snakemake workflow: it plans every shipped config, lints clean, and runs end to end on configs/test.yaml."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml
from helpers import DRY, REPO, TestRun, command, job_counts, snakemake

from effivlm.checkpoints import METADATA
from effivlm.methods import kept_count, kv_capacity

METRICS_COLUMNS = ["model", "method", "budget", "task", "score", "dense_score", "ratio", "loyalty", "n"]
FIGURES = ["retained_vs_budget", "task_ratios", "loyalty_heatmap", "pareto_OP", "pareto_OL"]
PAPER_TABLES = ["scores", "op", "og_ol", "compression", "efficiency"]


PAPER = ("--configfile", str(REPO / "configs/paper.yaml"))
PLANS = {
    "default": DRY,
    "test": (*DRY, "--configfile", str(REPO / "configs/test.yaml")),
    "paper": (*DRY, *PAPER),
    "bad": (*DRY, "--configfile", "../bad.yaml"),
    "lint": ("--lint",),
    "lint-paper": ("--lint", *PAPER),
}


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every planning run at once: each one spends most of its time importing, so they overlap well."""
    workdir = tmp_path_factory.mktemp("plans")
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    cfg["methods"]["randm"] = cfg["methods"].pop("random")
    (workdir / "bad.yaml").write_text(yaml.safe_dump(cfg))
    procs = {}
    for name, args in PLANS.items():
        run_dir = workdir / f"plan-{name}"
        run_dir.mkdir()
        procs[name] = subprocess.Popen(
            command(run_dir, *args),
            cwd=run_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def counts_of(planned: dict[str, subprocess.CompletedProcess[str]], name: str) -> dict[str, int]:
    result = planned[name]
    assert result.returncode == 0, result.stderr + result.stdout
    return job_counts(result.stdout)


def test_default_config_plans_the_embedded_grid(planned) -> None:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    n_variants = sum(len(m.get("budgets", [1.0])) for m in cfg["methods"].values())
    counts = counts_of(planned, "default")
    assert counts["synthetic_data"] == 1
    assert counts["backbone"] == len(cfg["models"])
    assert counts["evaluate"] == len(cfg["models"]) * len(cfg["tasks"]) * n_variants
    assert counts["aggregate"] == counts["figure_retained"] == counts["figure_task_ratios"] == 1
    assert counts["efficiency"] == n_variants * len(cfg["efficiency"]["models"])


def test_test_config_plans(planned) -> None:
    counts = counts_of(planned, "test")
    assert counts["backbone"] == 2
    # dense, random x2, fastv, visionzip, snapkv and Wanda 50% on both models and both tasks; lookm, AWQ and
    # Wanda 50% + FastV on one model
    assert counts["evaluate"] == 2 * 2 * (1 + 2 + 1 + 1 + 1 + 1) + 1 * 2 * 3
    # one calibration set, one calibration per model, one checkpoint per (model, weights entry) used
    assert counts["calibration_set"] == 1
    assert counts["calibrate"] == 2
    assert counts["compress"] == 3
    # the efficiency rule profiles Qwen2-VL only: its 9 (variant, budget) pairs
    assert counts["efficiency"] == 9


def test_paper_config_plans_the_full_grid_without_weights(planned) -> None:
    counts = counts_of(planned, "paper")
    # dense on all four models; 5 token methods x 3 budgets on three, 7 KV methods x 3 budgets on three;
    # 10 compressed checkpoints on the three main models
    assert counts["evaluate"] == 4 * 15 * 1 + 3 * 15 * 5 * 3 + 3 * 15 * 7 * 3 + 3 * 15 * 10
    assert counts["compress"] == 3 * 10 and counts["calibrate"] == 3 and counts["calibration_set"] == 1
    assert "backbone" not in counts and "synthetic_data" not in counts
    # one efficiency job per (model, variant, budget): every evaluation's grid without its 15 tasks
    assert counts["efficiency"] * 15 == counts["evaluate"]
    assert counts["paper_tables"] == 1 and counts["figure_pareto"] == 2 and counts["figure_loyalty"] == 1


def test_a_configfile_replaces_the_default_config(planned) -> None:
    """Snakemake would merge --configfile into config.yaml's models; the workflow must not."""
    result = planned["paper"]
    assert "-tiny" not in result.stdout + result.stderr


def test_a_bad_config_fails_before_any_job_with_one_line(planned) -> None:
    result = planned["bad"]
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("config: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "config: methods.randm.method: unknown method 'randm' (did you mean 'random'?); known: "
    )
    assert "Job stats" not in result.stdout


@pytest.mark.parametrize("name", ["lint", "lint-paper"])
def test_lint_is_clean(planned, name: str) -> None:
    result = planned[name]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.slow
def test_whole_dag_on_the_test_config(test_run: TestRun) -> None:
    tmp_path, results, result = test_run.workdir, test_run.results, test_run.result
    assert result.returncode == 0, result.stderr[-5000:]

    metrics = pd.read_csv(results / "tables" / "metrics.csv")
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    assert not missing, f"metrics.csv lacks {missing}; has {list(metrics.columns)}"
    # dense, random x2, fastv, visionzip, snapkv, wanda_50 on both models; lookm, awq_w4 on Qwen2-VL only,
    # wanda_50_fastv on LLaVA-OneVision only
    assert len(metrics) == 2 * 2 * (1 + 2 + 1 + 1 + 1 + 1) + 3 * 2
    assert set(metrics["method"]) == {
        "dense",
        "random",
        "fastv",
        "visionzip",
        "snapkv",
        "lookm",
        "wanda_50",
        "wanda_50_fastv",
        "awq_w4",
    }
    assert set(metrics[metrics["method"] == "lookm"]["model"]) == {"qwen2-vl-tiny"}
    dense = metrics[metrics["method"] == "dense"]
    assert len(dense) == 2 * 2
    assert (dense["loyalty"] == 1.0).all()
    # the 150-step test backbones answer: every ratio is defined, and a method that drops most of the image
    # loses agreement with dense somewhere (the equality checks of the other integration tests compare real
    # answers)
    assert (dense["score"] >= 0.5).all(), dense[["model", "task", "score"]]
    assert (dense["ratio"] == 1.0).all()
    assert metrics["ratio"].notna().all()
    assert (metrics[metrics["budget"] <= 0.1]["loyalty"] < 1.0).any()
    assert (metrics["n"] > 0).all() and (metrics["n"] <= 20).all()
    for name in ("summary.csv", "summary.md"):
        assert (results / "tables" / name).stat().st_size > 0

    # Every sample's log records the visual tokens kept per image and what each decoder layer saw (4 layers):
    # FastV at 0.4 from layer 1 on, VisionZip at 0.1 before the language model; one segment per Qwen2-VL image.
    for variant, budget, first_pruned in (("fastv", 0.4, 1), ("visionzip", 0.1, 0)):
        log = results / "eval" / "qwen2-vl-tiny" / variant / str(budget) / "color" / "predictions.jsonl"
        samples = pd.read_json(log, lines=True)
        assert len(samples) == 20
        for sample in samples.to_dict("records"):
            (n,) = sample["visual_tokens"]
            k = kept_count(budget, n)
            assert k < n and sample["visual_kept"] == [k]
            assert sample["layer_visual"] == [n] * first_pruned + [k] * (4 - first_pruned)

    # KV-cache methods: every layer's cache keeps floor(budget * prompt length) entries, and the bytes say so
    for variant, budget in (("snapkv", 0.1), ("lookm", 0.4)):
        log = results / "eval" / "qwen2-vl-tiny" / variant / str(budget) / "color" / "predictions.jsonl"
        for sample in pd.read_json(log, lines=True).to_dict("records"):
            length = sample["prompt_tokens"]
            assert sample["kv_tokens"] == [kv_capacity(budget, length)] * 4
            assert sample["kv_bytes"] * length == sample["kv_bytes_dense"] * kv_capacity(budget, length)

    # Parameter compression: each checkpoint says what it holds, and the jobs on it load it.
    wanda = json.loads((results / "compressed" / "qwen2-vl-tiny" / "wanda_50" / METADATA).read_text())
    assert wanda["method"]["name"] == "wanda" and wanda["weights"] == "wanda_50"
    assert all(layer["sparsity"] == 0.5 for layer in wanda["layers"].values())  # every row prunes half
    assert len(wanda["layers"]) == 4 * 7
    assert wanda["size_bytes"] < 4 * wanda["dense_parameters"]  # values + bitmask, smaller than dense float32
    awq = json.loads((results / "compressed" / "qwen2-vl-tiny" / "awq_w4" / METADATA).read_text())
    assert set(awq["structure"]["quantized"]) == set(awq["layers"]) and len(awq["layers"]) == 28
    job = json.loads(
        (results / "eval" / "llava-ov-tiny" / "wanda_50_fastv" / "0.4" / "color" / "metrics.json").read_text()
    )
    assert job["weights"] == "wanda_50"
    assert job["pipeline"]["compression"]["method"]["name"] == "wanda"
    assert job["model_path"].endswith("compressed/llava-ov-tiny/wanda_50")
    # the tables say what each checkpoint weighs against the dense model
    size = metrics.groupby("method")["size_share"].max()
    assert size["dense"] == 1.0 and 0.5 < size["wanda_50"] < 0.9 and size["awq_w4"] < 0.6

    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 0

    # Efficiency: one record per (model, variant, budget) of the profiled model (Qwen2-VL only in the test
    # config), task-independent; OE in the summary, speedups of dense against itself exactly 1.
    efficiency = pd.read_csv(results / "tables" / "efficiency.csv")
    profiled = efficiency[efficiency["model"] == "qwen2-vl-tiny"]
    qwen_rows = metrics[metrics["model"] == "qwen2-vl-tiny"][["method", "budget"]].drop_duplicates()
    assert len(profiled) == len(qwen_rows) == 9
    dense_eff = profiled[profiled["method"] == "dense"].iloc[0]
    assert dense_eff["ttft_speedup"] == 1.0 and dense_eff["decode_speedup"] == 1.0
    snap = profiled[profiled["method"] == "snapkv"].iloc[0]
    assert snap["kv_share"] < 0.2  # a tenth of the cache, up to rounding on a short prompt
    fastv = profiled[profiled["method"] == "fastv"].iloc[0]
    assert fastv["prefill_flops_share"] < 1.0 and fastv["ttft_ms"] > 0
    summary = pd.read_csv(results / "tables" / "summary.csv")
    assert summary.loc[summary["model"] == "qwen2-vl-tiny", "ttft_speedup"].notna().all()
    assert summary.loc[summary["model"] == "llava-ov-tiny", "ttft_speedup"].isna().all()  # not profiled
    pareto = pd.read_csv(results / "tables" / "pareto.csv")
    # both quality axes beside every efficiency figure (OP is defined: the dense models score above 0)
    assert set(pareto["quality"]) == {"OP", "OL"} and pareto["on_front"].any()
    for name in PAPER_TABLES:
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / "paper" / f"{name}.{ext}").stat().st_size > 0

    # The HTML report gathers the figures and tables, self-contained.
    report = snakemake(tmp_path, "--report", str(tmp_path / "report.html"), *test_run.config_args())
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text(errors="replace")
    for category in ("Performance", "Trade-offs", "Paper tables"):
        assert category in html

    # A second run finds nothing to do: every output is complete and no param drifts between runs.
    test_cfg = ("--configfile", str(REPO / "configs/test.yaml"), "--config", f"results={results}")
    again = snakemake(tmp_path, *DRY, *test_cfg)
    assert again.returncode == 0, again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr

    # Changing one method's params reruns exactly that variant's jobs (and the tables and figures after them).
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    cfg["methods"]["random"]["params"]["seed"] = 1
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    rerun = snakemake(tmp_path, *DRY, "--configfile", str(changed), "--config", f"results={results}")
    assert rerun.returncode == 0, rerun.stderr
    counts = job_counts(rerun.stdout)
    assert counts["evaluate"] == 2 * 2 * 2
    assert "backbone" not in counts and "synthetic_data" not in counts
    assert "/dense/" not in "".join(line for line in rerun.stdout.splitlines() if "output:" in line)

    # Changing a weights entry's params recompresses that checkpoint (not the calibration) and reruns exactly
    # the variants on it.
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    cfg["weights"]["wanda_50"]["params"]["sparsity"] = 0.4
    changed.write_text(yaml.safe_dump(cfg))
    rerun = snakemake(tmp_path, *DRY, "--configfile", str(changed), "--config", f"results={results}")
    assert rerun.returncode == 0, rerun.stderr
    counts = job_counts(rerun.stdout)
    assert counts["compress"] == 2 and counts["evaluate"] == 2 * 2 + 1 * 2
    assert "calibrate" not in counts and "calibration_set" not in counts
