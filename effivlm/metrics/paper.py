"""The aggregate metrics of EffiVLM-Bench (arXiv 2506.00479), as pure functions.

- retained ratio = score_compressed / score_dense, per (model, method, budget, task);
- OP (overall performance) = sqrt(mean over tasks of ratio^2), the RMS of the ratios. The arithmetic mean
  does not reproduce the published tables; the RMS does;
- OG (overall generalisation, lower is better) = 100 * population std / mean, across tasks, of the ratio
  averaged over models;
- OL (overall loyalty) = mean over tasks and models of the per-task loyalty, in %.

A dense score of 0 makes the ratio undefined: it is NaN, never a silent division by zero. The aggregates skip
NaN ratios (the tables count them) and return NaN only when nothing is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd


def retained_ratio(score: float, dense_score: float) -> float:
    """score / dense_score; NaN when the dense score is 0 or NaN (the ratio is then undefined)."""
    if dense_score == 0 or math.isnan(dense_score) or math.isnan(score):
        return math.nan
    return float(score) / float(dense_score)


def _as_array(values: Iterable[float], what: str) -> np.ndarray:
    arr = np.asarray(
        values if isinstance(values, np.ndarray | pd.Series | list | tuple) else list(values), dtype=float
    )
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: nothing to aggregate")
    if np.isinf(arr).any():
        raise ValueError(f"{what} contains infinite values: {arr[np.isinf(arr)].tolist()}")
    return arr


def overall_performance(ratios: Iterable[float]) -> float:
    """OP: the root mean square of the retained ratios, sqrt(mean(r^2)); NaN ratios are skipped."""
    arr = _as_array(ratios, "ratios")
    arr = arr[~np.isnan(arr)]
    return float(np.sqrt(np.mean(arr**2))) if arr.size else math.nan


def overall_generalization(ratios_by_task_model: pd.DataFrame) -> float:
    """OG: 100 * population std / mean, across tasks, of the ratio averaged over models (lower is better).

    Accepts either a wide frame (index = task, one column per model) or a long frame with columns
    ``task``, ``model`` and ``ratio``. NaN ratios are skipped in the model average; the result is NaN when
    no ratio is defined or when the mean ratio is 0.
    """
    df = ratios_by_task_model
    if {"task", "model", "ratio"} <= set(df.columns):
        df = df.pivot_table(index="task", columns="model", values="ratio", aggfunc="mean", dropna=False)
    if df.empty:
        raise ValueError("ratios_by_task_model is empty: nothing to aggregate")
    per_task = df.astype(float).mean(axis=1, skipna=True).dropna().to_numpy()
    if per_task.size == 0:
        return math.nan
    mean = per_task.mean()
    if mean == 0:  # every task lost everything: the coefficient of variation is undefined, not infinite
        return math.nan
    return float(100.0 * per_task.std(ddof=0) / mean)


def overall_loyalty(loyalties: Iterable[float]) -> float:
    """OL: the mean of per-task loyalties (each a share in [0, 1]), in %. NaN values are skipped."""
    arr = _as_array(loyalties, "loyalties")
    bad = arr[(arr < 0) | (arr > 1)]
    if bad.size:
        raise ValueError(f"loyalties must be shares in [0, 1], got {bad.tolist()} (percentages passed?)")
    arr = arr[~np.isnan(arr)]
    return float(100.0 * arr.mean()) if arr.size else math.nan
