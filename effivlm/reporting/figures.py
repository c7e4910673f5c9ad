"""Figures from metrics.csv: score retained (OP) against budget, and per-task retained ratios.

Rendered with the Agg canvas on explicit Figure objects (no pyplot, no display, no global state) and saved
deterministically: a fixed SVG hash salt and no dates in the metadata, so two runs give identical files.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from effivlm.reporting.aggregate import DENSE_BUDGET, DENSE_METHOD, OVERALL, build_summary_table

_RC = {
    "svg.hashsalt": "effivlm",
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_METADATA = {
    "svg": {"Date": None, "Creator": None},
    "png": {"Software": None},
}


def _read_metrics_csv(metrics_csv: Path) -> pd.DataFrame:
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        raise ValueError(f"{metrics_csv}: missing (run the aggregation first)")
    try:
        df = pd.read_csv(metrics_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{metrics_csv}: not a readable CSV ({err})") from None
    needed = ("model", "method", "budget", "task", "score", "ratio", "loyalty")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{metrics_csv}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ValueError(f"{metrics_csv}: no rows")
    bad = df.loc[~(df["budget"] > 0), "budget"]
    if len(bad):
        raise ValueError(f"{metrics_csv}: budgets must be > 0 for a log axis, got {sorted(set(bad))}")
    for col in ("model", "method", "task"):
        df[col] = df[col].astype(str)
    for col in ("family", "method_name", "note"):
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str)
    return df


def _save(fig: Figure, png: Path, svg: Path) -> None:
    """Save both formats to temporary names next to the targets, then rename them into place."""
    FigureCanvasAgg(fig)
    for path, fmt in ((Path(png), "png"), (Path(svg), "svg")):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format=fmt, dpi=150, metadata=_METADATA[fmt], bbox_inches="tight")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _budget_label(budget: float) -> str:
    return f"{budget:g}"


def _method_styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    colours = mpl.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    markers = "osD^v<>pPhX*"
    n = colours.N
    return {m: (colours(i % n), markers[i % len(markers)]) for i, m in enumerate(methods)}


def _grid(n_panels: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n_panels, max_cols)
    return math.ceil(n_panels / cols), cols


def plot_retained(metrics_csv: Path, png: Path, svg: Path) -> None:
    """Score retained (OP, RMS of per-task ratios) against budget: one panel per model plus "overall".

    One line per method variant; dense is the dashed reference at 1.0. The budget axis is logarithmic with a
    tick at every budget present.
    """
    metrics = _read_metrics_csv(metrics_csv)
    summary = build_summary_table(metrics)
    models = sorted(metrics["model"].unique()) + [OVERALL]
    methods = sorted(m for m in summary["method"].unique() if m != DENSE_METHOD)
    styles = _method_styles(methods)
    budgets = sorted(summary["budget"].unique())
    top = max(1.05, float(np.nanmax(summary["OP"].to_numpy(dtype=float), initial=1.0)) * 1.05)

    with mpl.rc_context(_RC):
        rows, cols = _grid(len(models))
        fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
        for ax in axes.flat[len(models) :]:
            ax.set_visible(False)
        for ax, model in zip(axes.flat, models, strict=False):
            panel = summary[summary["model"] == model]
            ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.2, label=DENSE_METHOD)
            ax.plot([DENSE_BUDGET], [1.0], marker="*", markersize=9, color="0.35", linestyle="none")
            for method in methods:
                line = panel[panel["method"] == method].sort_values("budget")
                if line.empty:
                    continue
                colour, marker = styles[method]
                ax.plot(line["budget"], line["OP"], marker=marker, color=colour, linewidth=1.5, label=method)
            ax.set_xscale("log")
            ax.set_xticks(budgets, [_budget_label(b) for b in budgets])
            ax.minorticks_off()
            ax.set_ylim(0, top)
            ax.set_title(f"{model} (RMS over all models and tasks)" if model == OVERALL else model)
            ax.set_xlabel("budget (share kept, log scale)")
            ax.set_ylabel("score retained (OP)")
        found: dict[str, object] = {}
        for ax in axes.flat[: len(models)]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                found.setdefault(label, handle)
        labels = [lab for lab in [DENSE_METHOD, *methods] if lab in found]
        fig.legend(
            [found[lab] for lab in labels],
            labels,
            loc="outside lower center",
            ncols=min(len(labels), 6),
            frameon=False,
        )
        fig.suptitle("Score retained against the dense model (OP = RMS of per-task score ratios)")
        _save(fig, png, svg)


def plot_task_ratios(metrics_csv: Path, png: Path, svg: Path) -> None:
    """Per-task retained ratio (score / dense score): bars per task at each (method, budget), one panel per model.

    Shows how unevenly tasks suffer under the same method and budget (what OG summarises).
    """
    metrics = _read_metrics_csv(metrics_csv)
    compressed = metrics[metrics["method"] != DENSE_METHOD]
    if compressed.empty:
        raise ValueError(f"{metrics_csv}: only dense jobs, no retained ratios to plot")
    models = sorted(compressed["model"].unique())
    tasks = sorted(compressed["task"].unique())
    groups = sorted({(m, float(b)) for m, b in zip(compressed["method"], compressed["budget"], strict=True)})
    task_colours = mpl.colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    width = 0.8 / len(tasks)
    finite = compressed["ratio"].to_numpy(dtype=float)
    top = max(1.1, float(np.nanmax(finite, initial=1.0)) * 1.1)

    with mpl.rc_context(_RC):
        fig_width = max(6.0, 0.22 * len(groups) * len(tasks) + 1.5)
        fig = Figure(figsize=(fig_width, 2.9 * len(models) + 0.8), layout="constrained")
        axes = fig.subplots(len(models), 1, squeeze=False, sharex=True).flat
        x = np.arange(len(groups))
        separators = [i - 0.5 for i in range(1, len(groups)) if groups[i][0] != groups[i - 1][0]]
        for ax, model in zip(axes, models, strict=True):
            panel = compressed[compressed["model"] == model].set_index(["method", "budget", "task"])["ratio"]
            for i, task in enumerate(tasks):
                heights = [panel.get((m, b, task), np.nan) for m, b in groups]
                offset = (i - (len(tasks) - 1) / 2) * width
                ax.bar(x + offset, heights, width=width, color=task_colours(i % task_colours.N), label=task)
            ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.0, label=f"{DENSE_METHOD} (1.0)")
            for boundary in separators:  # between method variants, so the budget groups read as a unit
                ax.axvline(boundary, color="0.6", linewidth=0.8)
            ax.set_ylim(0, top)
            ax.set_title(model)
            ax.set_ylabel("score / dense score")
            ax.grid(axis="x", visible=False)
        axes[-1].set_xticks(x, [f"{m}\n{_budget_label(b)}" for m, b in groups])
        axes[-1].set_xlabel("method and budget")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", title="task", frameon=False)
        fig.suptitle("Retained ratio per task (missing bar: not run, or dense score 0)")
        _save(fig, png, svg)


#: axis titles of the Pareto plots
_AXIS_TITLES = {
    "OP": "score retained (OP)",
    "OL": "loyalty (OL, %)",
    "ttft_speedup": "TTFT speedup (x, higher is better)",
    "decode_speedup": "decode speedup (x, higher is better)",
    "prefill_flops_share": "prefill FLOPs / dense",
    "peak_memory_share": "peak memory / dense",
    "kv_share": "KV-cache bytes / dense",
}


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing (run the aggregation first)")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=list(needed))
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def plot_pareto(pareto_csv: Path, quality: str, png: Path, svg: Path) -> None:
    """Quality against every cost axis: one row of panels per model plus "overall", one column per cost.

    Every (method, budget) point is drawn in its method's colour and marker; the frontier (pareto.csv's
    ``on_front``) is the black line through its points in cost order. A panel without efficiency figures
    says so instead of drawing nothing (no efficiency records, or an undefined quality: OP is undefined where
    the dense model scores 0).
    """
    needed = ("model", "quality", "cost", "method", "budget", "quality_value", "cost_value", "on_front")
    pareto = _read_csv(pareto_csv, needed)
    pareto = pareto[pareto["quality"] == quality]
    models = sorted(m for m in pareto["model"].unique() if m != OVERALL)
    models += [OVERALL] if (pareto["model"] == OVERALL).any() else []
    costs = [c for c in _AXIS_TITLES if c in set(pareto["cost"])]
    methods = sorted(pareto["method"].unique())
    styles = _method_styles(methods)
    with mpl.rc_context(_RC):
        if pareto.empty:
            fig = Figure(figsize=(6, 2), layout="constrained")
            ax = fig.subplots()
            ax.axis("off")
            note = f"no (method, budget) has both {quality} and an efficiency figure: nothing to trade off"
            ax.text(0.5, 0.5, note, ha="center", va="center")
            _save(fig, png, svg)
            return
        fig = Figure(figsize=(3.6 * len(costs), 3.0 * len(models) + 0.8), layout="constrained")
        axes = fig.subplots(len(models), len(costs), squeeze=False)
        for r, model in enumerate(models):
            for c, cost in enumerate(costs):
                ax = axes[r, c]
                panel = pareto[(pareto["model"] == model) & (pareto["cost"] == cost)]
                for method, points in panel.groupby("method", sort=True):
                    colour, marker = styles[method]
                    ax.scatter(
                        points["cost_value"], points["quality_value"], color=colour, marker=marker, s=22
                    )
                front = panel[panel["on_front"].astype(bool)].sort_values("cost_value")
                ax.plot(front["cost_value"], front["quality_value"], color="black", linewidth=1.0, zorder=0)
                ax.set_xlabel(_AXIS_TITLES[cost])
                ax.set_ylabel(_AXIS_TITLES[quality] if c == 0 else "")
                ax.set_title(model, fontsize=9)
        handles = [
            mpl.lines.Line2D([], [], color=styles[m][0], marker=styles[m][1], linestyle="none")
            for m in methods
        ]
        fig.legend(handles, methods, loc="outside lower center", ncols=min(len(methods), 6), frameon=False)
        fig.suptitle(f"{quality} against cost; the line joins the Pareto frontier")
        _save(fig, png, svg)


def plot_loyalty_heatmap(metrics_csv: Path, png: Path, svg: Path) -> None:
    """Loyalty (%) of every (method, budget) row on every task, averaged over models, and OL in the last column."""
    metrics = _read_metrics_csv(metrics_csv)
    metrics = metrics[metrics["method"] != DENSE_METHOD]
    tasks = sorted(metrics["task"].unique())
    table = 100 * metrics.pivot_table(
        index=["method", "budget"], columns="task", values="loyalty", aggfunc="mean"
    )
    table = table.reindex(columns=tasks)
    table["OL"] = table.mean(axis=1)
    table = table.sort_index(level=[0, 1], ascending=[True, False])
    labels = [f"{m} @ {_budget_label(b)}" for m, b in table.index]
    values = table.to_numpy(dtype=float)
    with mpl.rc_context({**_RC, "axes.grid": False}):
        fig = Figure(
            figsize=(1.0 + 0.75 * values.shape[1], 1.0 + 0.28 * max(len(labels), 1)), layout="constrained"
        )
        ax = fig.subplots()
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(values.shape[1]), [*tasks, "OL"], rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), value in np.ndenumerate(values):
            if not math.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 60 else "black",
                )
        fig.colorbar(image, ax=ax, label="loyalty (%): answers equal to dense's")
        ax.set_title("Loyalty per task (mean over models)")
        _save(fig, png, svg)
