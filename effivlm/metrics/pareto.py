"""Pareto frontiers of quality against cost, as pure functions.

A point (one method at one budget) is dominated when another point is at least as good on both axes and
strictly better on one. The frontier is the set of points no other point dominates: for every cost there is
no cheaper way to the same quality. Quality is always "higher is better" (OP, OL); a cost axis says which way
is better (speedups up, shares of FLOPs, memory or KV bytes down). Points with an undefined coordinate are never
on the frontier and dominate nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: quality axes of the summary table (higher is better)
QUALITY_AXES = ("OP", "OL")
#: cost axes of the summary table -> whether higher is better
COST_AXES = {
    "ttft_speedup": True,
    "decode_speedup": True,
    "prefill_flops_share": False,
    "peak_memory_share": False,
    "kv_share": False,
}


def pareto_mask(quality: np.ndarray, cost: np.ndarray, higher_cost_is_better: bool) -> np.ndarray:
    """Boolean mask of the non-dominated points (NaN points are never on the frontier)."""
    q = np.asarray(quality, dtype=float)
    c = np.asarray(cost, dtype=float)
    if q.shape != c.shape or q.ndim != 1:
        raise ValueError(f"quality and cost must be 1-D arrays of one length, got {q.shape} and {c.shape}")
    if not higher_cost_is_better:
        c = -c  # from here on, higher is better on both axes
    defined = ~(np.isnan(q) | np.isnan(c))
    qd, cd = q[defined], c[defined]
    # dominated[i]: some j is >= on both axes and > on one
    geq = (qd[None, :] >= qd[:, None]) & (cd[None, :] >= cd[:, None])
    gt = (qd[None, :] > qd[:, None]) | (cd[None, :] > cd[:, None])
    dominated = (geq & gt).any(axis=1)
    mask = np.zeros(q.shape, dtype=bool)
    mask[np.flatnonzero(defined)[~dominated]] = True
    return mask


def pareto_table(
    summary: pd.DataFrame,
    quality_axes: tuple[str, ...] = QUALITY_AXES,
    cost_axes: dict[str, bool] | None = None,
) -> pd.DataFrame:
    """Per model (and "overall"), quality axis and cost axis: every (method, budget) point with both coordinates
    and whether it is on the frontier. Columns: model, quality, cost, method, method_name, budget,
    quality_value, cost_value, on_front."""
    cost_axes = COST_AXES if cost_axes is None else cost_axes
    columns = [
        "model",
        "quality",
        "cost",
        "method",
        "method_name",
        "budget",
        "quality_value",
        "cost_value",
        "on_front",
    ]
    missing = [c for c in ("model", "method", "budget", *quality_axes, *cost_axes) if c not in summary]
    if missing:
        raise ValueError(f"summary table lacks column(s) {', '.join(missing)} for the Pareto frontiers")
    frames = []
    for model, group in summary.groupby("model", sort=False):
        for quality in quality_axes:
            for cost, higher in cost_axes.items():
                points = group[~(group[quality].isna() | group[cost].isna())]
                if points.empty:
                    continue
                frames.append(
                    pd.DataFrame(
                        {
                            "model": model,
                            "quality": quality,
                            "cost": cost,
                            "method": points["method"].to_numpy(),
                            "method_name": points.get("method_name", points["method"]).to_numpy(),
                            "budget": points["budget"].to_numpy(),
                            "quality_value": points[quality].to_numpy(dtype=float),
                            "cost_value": points[cost].to_numpy(dtype=float),
                            "on_front": pareto_mask(
                                points[quality].to_numpy(), points[cost].to_numpy(), higher
                            ),
                        }
                    )
                )
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]
