"""From job folders (metrics.json + predictions.jsonl) to the metrics and summary tables.

A job is one (model, method variant, budget, task) evaluation. The dense job of a model (method "dense",
budget 1.0) is the reference of every other job of that model on the same task: the retained ratio is
score / dense score and loyalty compares predictions doc by doc.

Each row also gets a paired bootstrap 95% interval (``effivlm.metrics.stats``): the samples of a task are
resampled with one index matrix per task (seeded from the fixed seed and the task name, so every model and
method of a task resamples the same documents), the ratio of per-sample score means and the loyalty are
recomputed per replicate, and OP / OL are recomputed per replicate from those. Dense rows are exactly [1, 1].
Flip counts (dense right and compressed wrong, and the reverse) use "right" = per-sample score >= 0.5.

Only ``load_job``, ``aggregate`` and the private writers touch the file system; the table builders are pure.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from effivlm.io import write_text_atomic
from effivlm.metrics import (
    flip_counts,
    is_right,
    loyalty,
    normalise_prediction,
    overall_generalization,
    overall_loyalty,
    overall_loyalty_interval,
    overall_performance,
    overall_performance_interval,
    retained_ratio,
)
from effivlm.metrics.pareto import pareto_table
from effivlm.metrics.stats import ALPHA, N_BOOT, SEED, derive_seed, paired_replicates, percentile_interval
from effivlm.reporting.efficiency import build_efficiency_table, load_efficiency, with_efficiency

DENSE_METHOD = "dense"
DENSE_BUDGET = 1.0
OVERALL = "overall"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"

_REQUIRED_METRICS = ("model", "method", "budget", "task", "score")
_REQUIRED_PREDICTION = ("doc_id", "prediction")
_PYARROW = importlib.util.find_spec("pyarrow") is not None
_KEY = ["model", "method", "budget", "task"]

Key = tuple[str, str, float, str]
# Per job: the bootstrap replicates of its ratio and of its loyalty (share), each of shape (n_boot,).
Replicates = dict[Key, tuple[np.ndarray, np.ndarray]]

METRICS_COLUMNS = [
    "model",
    "family",
    "method",
    "method_name",
    "method_params",
    "budget",
    "task",
    "metric",
    "score",
    "dense_score",
    "ratio",
    "ratio_lo",
    "ratio_hi",
    "loyalty",
    "loyalty_lo",
    "loyalty_hi",
    "flips_lost",
    "flips_gained",
    "n",
    "visual_kept_share",
    "kv_kept_share",
    "weights",
    "size_share",
    "note",
    "code_version",
    "effivlm_version",
    "job_dir",
]
SUMMARY_COLUMNS = [
    "model",
    "family",
    "method",
    "method_name",
    "budget",
    "n_models",
    "n_tasks",
    "n_ratio_undefined",
    "mean_score",
    "OP",
    "OP_lo",
    "OP_hi",
    "OG",
    "OL",
    "OL_lo",
    "OL_hi",
    "visual_kept_share",
    "kv_kept_share",
    "weights",
    "size_share",
    "baseline",
    "OP_vs_baseline",
    "note",
]

#: per kind of method, the budget-matched baseline every informed method of that kind must beat: spatial
#: pooling for visual-token methods (EffiVLM-Bench's), random eviction for KV-cache methods
BASELINES = {"visual": "pool", "layer": "pool", "kv": "random_kv"}


@dataclass(frozen=True)
class Job:
    """One loaded job: its metrics.json, its predictions (one row per sample) and where it came from."""

    metrics: dict[str, Any]
    predictions: pd.DataFrame = field(repr=False)
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str, float, str]:
        m = self.metrics
        return (str(m["model"]), str(m["method"]), float(m["budget"]), str(m["task"]))

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else f"job {self.key}"


# --------------------------------------------------------------------------------------------- loading


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing (every job folder needs {METRICS_FILE})")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    missing = [k for k in _REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    for key in ("budget", "score"):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: '{key}' must be a number, got {value!r}")
    if not 0 < metrics["budget"] <= 1:
        raise ValueError(f"{path}: 'budget' must be in (0, 1], got {metrics['budget']!r}")
    return metrics


def _as_text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _read_predictions(path: Path) -> pd.DataFrame:
    """The samples of a log: a fast read of the whole file, and, when anything is off, the line-by-line
    reading that names the first bad line."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (every job folder needs {PREDICTIONS_FILE})")
    fast = _read_predictions_fast(path)
    return fast if fast is not None else _read_predictions_checked(path)


def _parse_lines(path: Path) -> pd.DataFrame | None:
    """The JSON-lines file as a table, or None when it cannot be parsed whole.

    pyarrow's parser (multithreaded, about 2.5x faster; lmms-eval's datasets brings it) when installed. It
    infers types itself (a prediction that looks like a date would become a timestamp), so its table is kept
    only when doc ids are integers or text and predictions are text; otherwise pandas' own parser, with no
    type conversion, reads the file again.
    """
    if _PYARROW:
        try:
            df = pd.read_json(path, lines=True, encoding="utf-8", engine="pyarrow")
        except (ValueError, UnicodeDecodeError):  # pyarrow's ArrowInvalid is a ValueError
            df = None
        if (
            df is not None
            and all(k in df.columns for k in _REQUIRED_PREDICTION)
            and (pd.api.types.is_integer_dtype(df["doc_id"]) or pd.api.types.is_string_dtype(df["doc_id"]))
            and pd.api.types.is_string_dtype(df["prediction"])
        ):
            return df
    try:
        return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _read_predictions_fast(path: Path) -> pd.DataFrame | None:
    """The whole log parsed at once, or None when it is not a clean log: not JSON objects, a missing key, a
    duplicate doc id or no samples (the checked reader then says which line)."""
    df = _parse_lines(path)
    if df is None:
        return None
    if df.empty or any(k not in df.columns for k in _REQUIRED_PREDICTION):
        return None
    doc_ids, predictions = df["doc_id"], df["prediction"]
    if doc_ids.isna().any() or doc_ids.duplicated().any() or predictions.isna().any():
        return None  # a null prediction is legal but rare: the checked reader turns it into ""
    if doc_ids.dtype == object and doc_ids.map(type).nunique() > 1:
        return None
    if not pd.api.types.is_string_dtype(predictions):
        return None  # numbers among the answers: a column of 7 and 9.5 reads 7 as 7.0; the checked reader keeps "7"
    return df


def _read_predictions_checked(path: Path) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    seen: set[Any] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in _REQUIRED_PREDICTION if k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
        if rec["doc_id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate doc_id {rec['doc_id']!r}")
        seen.add(rec["doc_id"])
        rec["prediction"] = _as_text(rec["prediction"])
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no samples (an evaluation log must hold at least one prediction)")
    return pd.DataFrame.from_records(records)


def load_job(job_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Read ``metrics.json`` and ``predictions.jsonl`` of a job folder.

    Raises a one-line ValueError naming the file when it is missing, corrupt or holds no samples, and when
    metrics.json's ``n`` disagrees with the number of predictions (a truncated log).
    """
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        raise ValueError(f"{job_dir}: not a job folder (no such directory)")
    metrics = _read_metrics(job_dir / METRICS_FILE)
    predictions = _read_predictions(job_dir / PREDICTIONS_FILE)
    n = metrics.get("n")
    if n is not None and n != len(predictions):
        raise ValueError(
            f"{job_dir / PREDICTIONS_FILE}: {len(predictions)} samples, but {METRICS_FILE} says n={n}"
        )
    return metrics, predictions


def _as_job(job: Job | Path | str, code_version: str | None = None) -> Job:
    if isinstance(job, Job):
        return job
    metrics, predictions = load_job(Path(job))
    _check_origin(Path(job), metrics, code_version)
    return Job(metrics, predictions, Path(job))


def _check_origin(job_dir: Path, metrics: dict[str, Any], code_version: str | None) -> None:
    """A log from another configuration fails: a folder named <model>/<variant>/<budget>/<task> (the
    workflow's layout) must hold that job's metrics, and with ``code_version`` every job must carry it."""
    where = job_dir / METRICS_FILE
    parts = job_dir.parts[-4:]
    if len(parts) == 4:
        model, method, budget, task = parts
        try:
            same_budget = float(budget) == float(metrics["budget"])
        except ValueError:
            same_budget = True  # not the workflow's layout: nothing to compare
        if same_budget and (model, method, task) != (metrics["model"], metrics["method"], metrics["task"]):
            raise ValueError(
                f"{where}: a log of another configuration (model '{metrics['model']}', method "
                f"'{metrics['method']}', task '{metrics['task']}') in the folder of {model}/{method}/{task}"
            )
    if code_version is not None and str(metrics.get("code_version", "")) != str(code_version):
        raise ValueError(
            f"{where}: a log of code version '{metrics.get('code_version', '')}', the workflow is at "
            f"'{code_version}' (rerun the job)"
        )


# ----------------------------------------------------------------------------------------- metrics table


def _expected_dense_dir(job: Job) -> str:
    """Best guess of where the dense job would live: the job's own path with method -> dense, budget -> 1.0."""
    if job.path is None:
        return "(unknown: the jobs were given without folders)"
    method, budget = job.metrics["method"], float(job.metrics["budget"])
    parts = []
    for part in job.path.parts:
        if part == method:
            part = DENSE_METHOD
        else:
            try:
                if float(part) == budget:
                    part = "1.0" if "." in part else "1"
            except ValueError:
                pass
        parts.append(part)
    return str(Path(*parts))


def _kept_share(metrics: dict[str, Any], section: str, kept_key: str, total_key: str) -> float:
    """``metrics[section][kept_key] / metrics[section][total_key]``; NaN where the job did not record them."""
    counts = metrics.get(section)
    if not isinstance(counts, dict):
        return math.nan
    total, kept = counts.get(total_key), counts.get(kept_key)
    if not isinstance(total, int | float) or not isinstance(kept, int | float) or total <= 0:
        return math.nan
    return float(kept) / float(total)


def _size_share(metrics: dict[str, Any]) -> float:
    """Checkpoint bytes over the dense model's bytes (same dtype) of a job on a compressed checkpoint; 1.0
    for a dense model."""
    compression = (metrics.get("pipeline") or {}).get("compression")
    if not compression:
        return 1.0
    size, dense = compression.get("size_bytes"), compression.get("dense_bytes")
    return float(size) / float(dense) if size and dense else math.nan


def _baseline_of(method_name: str) -> str:
    """The budget-matched baseline of a method's kind ("" for dense, unknown methods and the baselines' kinds
    without one)."""
    from effivlm.methods import METHODS

    try:
        kind = METHODS.get(method_name).kind
    except (KeyError, ValueError):
        return ""
    return BASELINES.get(kind, "")


def _predictions_by_doc(job: Job) -> dict[Any, str]:
    return dict(zip(job.predictions["doc_id"], job.predictions["prediction"].map(_as_text), strict=True))


def _as_score(value: Any) -> float:
    """A per-sample score as a float; NaN when absent or not a number (e.g. a judge's dict)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return math.nan


@dataclass(frozen=True)
class _Samples:
    """One job's samples in its task's canonical doc order: scores (NaN when missing) and normalised answers."""

    scores: np.ndarray  # (n,) float
    answers: np.ndarray  # (n,) object: normalised predictions

    @property
    def right(self) -> np.ndarray | None:
        """Per-sample correctness (score >= 0.5), or None when the scores are not all in [0, 1]."""
        try:
            return is_right(self.scores)
        except ValueError:
            return None


def _doc_order(ref: Job) -> list[Any]:
    """The canonical order of a (model, task)'s samples: the dense job's doc ids sorted by their repr.

    Sorting (rather than file order) makes the bootstrap draws independent of how a log happens to be
    ordered, and lets every model of a task resample the same documents.
    """
    return sorted(ref.predictions["doc_id"], key=repr)


def _samples(job: Job, order: list[Any]) -> _Samples:
    """Vectorised over the samples: scores converted one by one only when the column is not numeric, and
    each distinct answer normalised once (a task's answers repeat: "yes", "b", "3")."""
    preds = job.predictions
    rows = pd.Index(preds["doc_id"]).get_indexer(order)
    if (rows < 0).any():
        raise ValueError(f"{job.where}: doc ids differ from its dense job's")  # the caller checks first
    if "score" not in preds:
        scores = np.full(len(order), math.nan)
    elif pd.api.types.is_numeric_dtype(preds["score"]):
        scores = preds["score"].to_numpy(dtype=float, na_value=math.nan)[rows]
    else:
        scores = np.array([_as_score(v) for v in preds["score"]], dtype=float)[rows]
    codes, distinct = pd.factorize(preds["prediction"])
    normalised = np.array([normalise_prediction(_as_text(text)) for text in distinct], dtype=object)
    return _Samples(scores=scores, answers=normalised[codes[rows]])


def _interval_note(samples: _Samples, ref_samples: _Samples, ratio: float) -> str:
    """Why the ratio interval may not bracket the ratio: missing per-sample scores, or a non-mean score."""
    if np.isnan(samples.scores).any() or np.isnan(ref_samples.scores).any():
        return "ratio interval undefined: per-sample scores missing or not numbers"
    dense_mean = float(ref_samples.scores.mean())
    if dense_mean == 0:
        return ""
    sample_ratio = float(samples.scores.mean()) / dense_mean
    if not math.isclose(sample_ratio, ratio, rel_tol=1e-6, abs_tol=1e-9):
        return (
            f"ratio interval from per-sample score means (ratio {sample_ratio:.4g}); "
            "the job score is not their mean"
        )
    return ""


def _metrics_and_replicates(
    jobs: Iterable[Job | Path | str], n_boot: int, seed: int, alpha: float, code_version: str | None = None
) -> tuple[pd.DataFrame, Replicates]:
    loaded = [_as_job(j, code_version) for j in jobs]
    if not loaded:
        raise ValueError("no jobs given: nothing to aggregate")
    by_key: dict[Key, Job] = {}
    for job in loaded:
        if job.key in by_key:
            raise ValueError(f"duplicate job {job.key}: {by_key[job.key].where} and {job.where}")
        by_key[job.key] = job
    dense: dict[tuple[str, str], Job] = {}
    for job in loaded:
        if job.metrics["method"] == DENSE_METHOD:
            if float(job.metrics["budget"]) != DENSE_BUDGET:
                raise ValueError(
                    f"{job.where}: a dense job must have budget {DENSE_BUDGET}, got {job.metrics['budget']!r}"
                )
            dense[(job.key[0], job.key[3])] = job

    reference: dict[tuple[str, str], tuple[list[Any], _Samples]] = {}
    replicates: Replicates = {}
    ones = np.ones(n_boot)
    rows = []
    for job in loaded:
        m = job.metrics
        model, method, budget, task = job.key
        ref = dense.get((model, task))
        if ref is None:
            raise ValueError(
                f"no dense job for model '{model}' and task '{task}' (needed by {job.where}); expected a job "
                f"with method '{DENSE_METHOD}' and budget {DENSE_BUDGET} at {_expected_dense_dir(job)}"
            )
        if (model, task) not in reference:
            order = _doc_order(ref)
            reference[(model, task)] = (order, _samples(ref, order))
        order, ref_samples = reference[(model, task)]
        task_seed = derive_seed(seed, task)
        score, dense_score = float(m["score"]), float(ref.metrics["score"])
        notes = []
        if ref is job:
            ratio, loyal = (math.nan, 1.0) if dense_score == 0 else (1.0, 1.0)
            ratio_reps = ones * ratio
            loyalty_reps = ones
            lost, gained = 0, 0
        else:
            ratio = retained_ratio(score, dense_score)
            if not order or set(job.predictions["doc_id"]) != set(order):
                try:  # loyalty() names the doc ids present on one side only, or says there are none
                    loyalty(_predictions_by_doc(job), _predictions_by_doc(ref))
                except ValueError as err:
                    raise ValueError(f"{job.where} against dense {ref.where}: {err}") from None
            samples = _samples(job, order)
            agree = samples.answers == ref_samples.answers  # (n,) bool
            loyal = float(agree.mean())
            ratio_reps, loyalty_reps = paired_replicates(
                samples.scores, ref_samples.scores, agree, n_boot, task_seed
            )
            if math.isnan(ratio):
                ratio_reps = ones * math.nan
            right, ref_right = samples.right, ref_samples.right
            lost, gained = (
                flip_counts(right, ref_right) if right is not None and ref_right is not None else (None, None)
            )
            if not math.isnan(ratio):
                notes.append(_interval_note(samples, ref_samples, ratio))
        if math.isnan(ratio):
            notes.insert(0, f"ratio undefined: dense score is {dense_score}")
        replicates[job.key] = (ratio_reps, loyalty_reps)
        ratio_lo, ratio_hi = percentile_interval(ratio_reps, alpha)
        loyalty_lo, loyalty_hi = percentile_interval(loyalty_reps, alpha)
        rows.append(
            {
                "model": model,
                "family": str(m.get("family", "")),
                "method": method,
                "method_name": str(m.get("method_name", method)),
                "method_params": json.dumps(m.get("method_params", {}), sort_keys=True),
                "budget": budget,
                "task": task,
                "metric": str(m.get("metric", "")),
                "score": score,
                "dense_score": dense_score,
                "ratio": ratio,
                "ratio_lo": ratio_lo,
                "ratio_hi": ratio_hi,
                "loyalty": loyal,
                "loyalty_lo": loyalty_lo,
                "loyalty_hi": loyalty_hi,
                "flips_lost": lost,
                "flips_gained": gained,
                "n": int(m.get("n", len(job.predictions))),
                "visual_kept_share": _kept_share(m, "visual_tokens", "kept", "total"),
                "kv_kept_share": _kept_share(m, "kv_cache", "bytes", "dense_bytes"),
                "weights": str(m.get("weights") or ""),
                "size_share": _size_share(m),
                "note": "; ".join(n for n in notes if n),
                "code_version": str(m.get("code_version", "")),
                "effivlm_version": str(m.get("effivlm_version", "")),
                "job_dir": str(job.path) if job.path is not None else "",
            }
        )
    table = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    table = table.astype({"flips_lost": "Int64", "flips_gained": "Int64"})
    return table.sort_values(_KEY, kind="mergesort").reset_index(drop=True), replicates


def build_metrics_table(
    jobs: Iterable[Job | Path | str], *, n_boot: int = N_BOOT, seed: int = SEED, alpha: float = ALPHA
) -> pd.DataFrame:
    """One row per (model, method, budget, task), with the ratio and loyalty against the model's dense job.

    Also the paired bootstrap interval (level 1 - alpha) of the ratio and of the loyalty, and the flip counts
    (``flips_lost``: dense right, compressed wrong; ``flips_gained``: the reverse; empty when the per-sample
    scores are not all in [0, 1]). The ratio interval resamples per-sample score means; it is NaN when the
    ratio is undefined, when per-sample scores are missing, or when a resample's dense mean is 0.

    Raises ValueError for duplicate jobs, a dense job whose budget is not 1.0, or a (model, task) without
    a dense job (naming the model, the task and the folder where it was expected).
    """
    return _metrics_and_replicates(jobs, n_boot, seed, alpha)[0]


def build_tables(
    jobs: Iterable[Job | Path | str],
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    alpha: float = ALPHA,
    code_version: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, summary) with bootstrap intervals on both; the summary's OP/OL intervals need the replicates.
    With ``code_version``, a job folder holding a log of another code version fails, naming it."""
    metrics, replicates = _metrics_and_replicates(jobs, n_boot, seed, alpha, code_version)
    return metrics, build_summary_table(metrics, replicates, alpha=alpha)


# ----------------------------------------------------------------------------------------- summary table


_NAN_INTERVAL = (math.nan, math.nan)


def _intervals(group: pd.DataFrame, replicates: Replicates | None, alpha: float) -> dict[str, float]:
    """OP and OL intervals of a group of jobs: each job's replicates recombined replicate by replicate.

    OP uses the jobs whose ratio is defined (as OP does); NaN intervals when replicates are not given or a
    job of the group has none.
    """
    keys = list(group[_KEY].itertuples(index=False, name=None))
    if replicates is None or any(k not in replicates for k in keys):
        op, ol = _NAN_INTERVAL, _NAN_INTERVAL
    else:
        defined = [k for k, r in zip(keys, group["ratio"].notna(), strict=True) if r]
        op = (
            overall_performance_interval(np.column_stack([replicates[k][0] for k in defined]), alpha)
            if defined
            else _NAN_INTERVAL
        )
        ol = overall_loyalty_interval(np.column_stack([replicates[k][1] for k in keys]), alpha)
    return {"OP_lo": op[0], "OP_hi": op[1], "OL_lo": ol[0], "OL_hi": ol[1]}


def _summarise(group: pd.DataFrame, replicates: Replicates | None, alpha: float) -> dict[str, Any]:
    undefined = group.loc[group["ratio"].isna(), ["model", "task"]]
    og = overall_generalization(group[["task", "model", "ratio"]])
    notes = []
    if len(undefined):
        pairs = ", ".join(f"{m}/{t}" for m, t in undefined.itertuples(index=False))
        notes.append(f"ratio undefined (dense score 0) for {pairs}")
    if math.isnan(og) and group["ratio"].notna().any():
        notes.append("OG undefined (mean ratio 0)")
    share = group["visual_kept_share"].dropna()
    kv_share = group["kv_kept_share"].dropna()
    size_share = group["size_share"].dropna()
    weights = sorted(set(group["weights"].fillna("").astype(str)) - {""})
    return {
        "n_models": group["model"].nunique(),
        "n_tasks": group["task"].nunique(),
        "n_ratio_undefined": len(undefined),
        "mean_score": float(group["score"].mean()),
        "OP": overall_performance(group["ratio"]),
        "OG": og,
        "OL": overall_loyalty(group["loyalty"]),
        "visual_kept_share": float(share.mean()) if len(share) else math.nan,
        "kv_kept_share": float(kv_share.mean()) if len(kv_share) else math.nan,
        "weights": ", ".join(weights),
        "size_share": float(size_share.mean()) if len(size_share) else math.nan,
        "note": "; ".join(notes),
        **_intervals(group, replicates, alpha),
    }


def _sort_summary(df: pd.DataFrame) -> pd.DataFrame:
    order = df.assign(_overall=df["model"] == OVERALL)
    order = order.sort_values(["_overall", "model", "method", "budget"], kind="mergesort")
    return order.drop(columns="_overall").reset_index(drop=True)


def build_summary_table(
    metrics: pd.DataFrame, replicates: Replicates | None = None, *, alpha: float = ALPHA
) -> pd.DataFrame:
    """One row per (model, method, budget) plus model="overall" rows per (method, budget).

    Per model: mean score, OP (RMS of the per-task ratios), OG, OL (mean loyalty, %), number of tasks.
    Overall, as the paper aggregates: OP over all (model, task) ratios, OG across tasks of the
    model-averaged ratio, OL averaged over tasks and models. "overall" rows come last.

    ``OP_lo/OP_hi`` and ``OL_lo/OL_hi`` (%) are bootstrap intervals recomputed from each job's replicates
    (from ``build_tables``); without ``replicates`` (e.g. from a metrics.csv alone) they are NaN.
    """
    missing = [
        c for c in ("model", "method", "budget", "task", "score", "ratio", "loyalty") if c not in metrics
    ]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {', '.join(missing)}")
    if metrics.empty:
        raise ValueError("metrics table is empty: nothing to summarise")
    metrics = metrics.copy()
    for col in ("family", "method_name"):
        if col not in metrics:
            metrics[col] = metrics["method"] if col == "method_name" else ""
    for col in ("visual_kept_share", "kv_kept_share", "size_share"):
        if col not in metrics:
            metrics[col] = math.nan
    if "weights" not in metrics:
        metrics["weights"] = ""

    rows = []
    for (model, method, budget), group in metrics.groupby(["model", "method", "budget"], sort=True):
        rows.append(
            {
                "model": model,
                "family": str(group["family"].iloc[0]),
                "method": method,
                "method_name": str(group["method_name"].iloc[0]),
                "budget": float(budget),
                **_summarise(group, replicates, alpha),
            }
        )
    for (method, budget), group in metrics.groupby(["method", "budget"], sort=True):
        rows.append(
            {
                "model": OVERALL,
                "family": "",
                "method": method,
                "method_name": str(group["method_name"].iloc[0]),
                "budget": float(budget),
                **_summarise(group, replicates, alpha),
            }
        )
    return _sort_summary(_against_baseline(pd.DataFrame(rows, columns=SUMMARY_COLUMNS)))


def _against_baseline(summary: pd.DataFrame) -> pd.DataFrame:
    """``baseline`` and ``OP_vs_baseline``: OP minus the OP of the method kind's baseline (``BASELINES``) for the
    same model (or overall) and budget, so a method that loses to it shows a negative number; NaN where no
    baseline run shares the budget or the method's kind has no baseline."""
    summary["baseline"] = [_baseline_of(name) for name in summary["method_name"]]
    base = summary[summary["method_name"] == summary["baseline"]].set_index(
        ["method_name", "model", "budget"]
    )
    base = base["OP"][~base.index.duplicated()]
    keys = pd.MultiIndex.from_frame(summary[["baseline", "model", "budget"]])
    summary["OP_vs_baseline"] = summary["OP"].to_numpy() - base.reindex(keys).to_numpy()
    return summary


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, numbers to 3 decimals (NaN shown as n/a).

    OP and OL carry their interval, ``0.873 [0.851, 0.894]`` (``[n/a]`` when it is undefined), when the
    summary has the interval columns.
    """
    columns = [
        ("model", "model"),
        ("method", "method"),
        ("budget", "budget"),
        ("n_tasks", "tasks"),
        ("mean_score", "mean score"),
        ("OP", "OP"),
        ("OG", "OG"),
        ("OL", "OL (%)"),
        ("visual_kept_share", "visual kept"),
        ("kv_kept_share", "KV kept"),
        ("weights", "weights"),
        ("size_share", "size"),
        ("baseline", "baseline"),
        ("OP_vs_baseline", "OP - baseline"),
        ("ttft_speedup", "TTFT x"),
        ("decode_speedup", "decode x"),
    ]

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return str(value)
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3f}"
        return str(value).replace("|", "\\|")

    columns = [(c, title) for c, title in columns if c in summary]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|"
        + "|".join("---" if c in ("model", "method", "weights", "baseline") else "---:" for c, _ in columns)
        + "|",
    ]
    for rec in _sort_summary(summary).to_dict("records"):
        values = [rec[c] for c, _ in columns]
        values = [int(v) if c in ("n_tasks",) else v for v, (c, _) in zip(values, columns, strict=True)]
        cells = [cell(v) for v in values]
        for i, (c, _) in enumerate(columns):
            if c in ("OP", "OL") and f"{c}_lo" in rec:
                lo, hi = float(rec[f"{c}_lo"]), float(rec[f"{c}_hi"])
                bounds = "n/a" if math.isnan(lo) or math.isnan(hi) else f"{lo:.3f}, {hi:.3f}"
                cells[i] += f" [{bounds}]"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ writing


def aggregate(
    job_dirs: Sequence[Path],
    tables_dir: Path,
    efficiency_files: Sequence[Path] = (),
    *,
    code_version: str | None = None,
) -> dict[str, Path]:
    """Build the tables from job folders (and the efficiency rule's records) and write them atomically:
    metrics.csv, summary.csv and summary.md (with the OE columns), efficiency.csv and pareto.csv.

    Returns {"metrics", "summary", "summary_md", "efficiency", "pareto"} -> path.
    """
    metrics, summary = build_tables([Path(d) for d in job_dirs], code_version=code_version)
    efficiency = build_efficiency_table(load_efficiency(list(efficiency_files)))
    summary = with_efficiency(summary, efficiency)
    pareto = pareto_table(summary)
    tables_dir = Path(tables_dir)

    def csv(name: str, df: pd.DataFrame) -> Path:
        return write_text_atomic(tables_dir / name, df.to_csv(index=False, lineterminator="\n"))

    return {
        "metrics": csv("metrics.csv", metrics),
        "summary": csv("summary.csv", summary),
        "summary_md": write_text_atomic(tables_dir / "summary.md", summary_markdown(summary)),
        "efficiency": csv("efficiency.csv", efficiency),
        "pareto": csv("pareto.csv", pareto),
    }
