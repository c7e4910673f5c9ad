"""The paper's tables, from metrics.csv, summary.csv and efficiency.csv, as CSV, Markdown and LaTeX.

- ``scores``: per model, the score of every (method, budget) on every benchmark (EffiVLM-Bench's per-benchmark
  tables), with the row's OP;
- ``op``: OP per method (rows) and model x budget (columns), "overall" included;
- ``og_ol``: per (method, budget) over all models: OP, OG and OL with their intervals;
- ``compression``: the parameter-compression view: every variant on a compressed checkpoint, with the
  checkpoint's size against dense, OP, OL and its speedups;
- ``efficiency``: OE per (method, budget) over all models (geometric means) and per model: TTFT and decode
  speedups, FLOPs, peak memory and KV-cache shares.

The builders are pure; :func:`write_paper_tables` reads the CSVs and writes every table in the three formats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from effivlm.io import write_text_atomic

OVERALL = "overall"
TABLES = ("scores", "op", "og_ol", "compression", "efficiency")


def _budget(value: float) -> str:
    return f"{100 * value:g}%"


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """Dense first, then methods by name and budgets descending (the paper's order)."""
    key = df["method"].ne("dense").astype(int)
    return (
        df.assign(_dense=key)
        .sort_values(["_dense", "method", "budget"], ascending=[True, True, False], kind="stable")
        .drop(columns="_dense")
    )


def _by_model(df: pd.DataFrame) -> pd.DataFrame:
    """The rows model by model (by name, "overall" last), each model's rows in the paper's order."""
    models = [m for m in sorted(df["model"].unique()) if m != OVERALL] + [OVERALL]
    parts = [_order(df[df["model"] == m]) for m in models if (df["model"] == m).any()]
    return pd.concat(parts, ignore_index=True) if parts else df


def scores_table(metrics: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """model, method, budget, one column per task (its score), and OP."""
    wide = metrics.pivot_table(
        index=["model", "method", "budget"], columns="task", values="score", aggfunc="first", sort=True
    ).reset_index()
    wide.columns.name = None
    op = summary[summary["model"] != OVERALL][["model", "method", "budget", "OP"]]
    wide = wide.merge(op, on=["model", "method", "budget"], how="left")
    return _by_model(wide)


def op_table(summary: pd.DataFrame) -> pd.DataFrame:
    """OP with one row per method and one column per (model, budget); "overall" columns last."""
    df = summary.copy()
    models = sorted(m for m in df["model"].unique() if m != OVERALL) + [OVERALL]
    df["column"] = [f"{m} {_budget(b)}" for m, b in zip(df["model"], df["budget"], strict=True)]
    wide = df.pivot_table(index="method", columns="column", values="OP", aggfunc="first").reset_index()
    wide.columns.name = None
    budgets = sorted(df["budget"].unique(), reverse=True)
    ordered = [f"{m} {_budget(b)}" for m in models for b in budgets if f"{m} {_budget(b)}" in wide]
    dense_first = wide["method"].ne("dense").astype(int)
    wide = wide.assign(_d=dense_first).sort_values(["_d", "method"], kind="stable").drop(columns="_d")
    return wide[["method", *ordered]].reset_index(drop=True)


def og_ol_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The overall rows: OP, OG and OL (%), with the bootstrap intervals of OP and OL."""
    cols = ["method", "budget", "OP", "OP_lo", "OP_hi", "OG", "OL", "OL_lo", "OL_hi"]
    overall = summary[summary["model"] == OVERALL]
    return _order(overall[[c for c in cols if c in overall]]).reset_index(drop=True)


def compression_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every variant on a compressed checkpoint (and dense), per model and overall."""
    cols = [
        "model",
        "method",
        "weights",
        "budget",
        "size_share",
        "OP",
        "OL",
        "ttft_speedup",
        "decode_speedup",
    ]
    weights = summary["weights"].fillna("").astype(str)
    rows = summary[(weights != "") | (summary["method"] == "dense")]
    return _by_model(rows[[c for c in cols if c in rows]])


def efficiency_summary(efficiency: pd.DataFrame) -> pd.DataFrame:
    """OE per model and overall: speedups with their quartile ranges, and the shares of dense's costs."""
    cols = [
        "model",
        "method",
        "budget",
        "ttft_ms",
        "ttft_speedup",
        "ttft_speedup_lo",
        "ttft_speedup_hi",
        "decode_ms",
        "decode_speedup",
        "tokens_per_s",
        "prefill_flops_share",
        "decode_flops_share",
        "peak_memory_share",
        "kv_share",
    ]
    if efficiency.empty:
        return pd.DataFrame(columns=cols)
    return _by_model(efficiency)[cols]


# ------------------------------------------------------------------------------------------------ formats
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table, numbers to 3 decimals (NaN as n/a), text columns left-aligned."""
    header = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in rec) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``); NaN shown as --."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    spec = "".join("r" if n else "l" for n in numeric)

    def cell(value: Any) -> str:
        text = _cell(value)
        return "--" if text == "n/a" else latex_escape(text)

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(str(c)) for c in df.columns) + r" \\",
        r"\midrule",
        *(" & ".join(cell(v) for v in rec) + r" \\" for rec in df.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


CAPTIONS = {
    "scores": "Score of every method and budget on every benchmark, per model, with OP.",
    "op": "Overall performance (OP, RMS of the retained ratios) per method, model and budget.",
    "og_ol": "Overall performance, generalisation (OG, lower is better) and loyalty (OL, %) over all models, "
    "with 95% paired-bootstrap intervals.",
    "compression": "Parameter compression: checkpoint size against dense, OP, OL and speedups.",
    "efficiency": "Efficiency (OE): speedups of time to first token and decoding against dense, and the "
    "shares of dense's FLOPs, peak memory and KV cache.",
}


def build_paper_tables(
    metrics: pd.DataFrame, summary: pd.DataFrame, efficiency: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    builders: dict[str, Callable[[], pd.DataFrame]] = {
        "scores": lambda: scores_table(metrics, summary),
        "op": lambda: op_table(summary),
        "og_ol": lambda: og_ol_table(summary),
        "compression": lambda: compression_table(summary),
        "efficiency": lambda: efficiency_summary(efficiency),
    }
    return {name: build() for name, build in builders.items()}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: table is missing (run the aggregate rule first)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        if isinstance(err, pd.errors.EmptyDataError) and Path(path).name == "efficiency.csv":
            return pd.DataFrame()
        raise ValueError(f"{path}: not a readable CSV table ({' '.join(str(err).split())})") from None


def write_paper_tables(
    metrics_csv: Path, summary_csv: Path, efficiency_csv: Path, out_dir: Path
) -> dict[str, list[Path]]:
    """Every table of :data:`TABLES` as <name>.csv, <name>.md and <name>.tex in ``out_dir``."""
    tables = build_paper_tables(
        _read_csv(Path(metrics_csv)), _read_csv(Path(summary_csv)), _read_csv(Path(efficiency_csv))
    )
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {}
    for name, df in tables.items():
        written[name] = [
            write_text_atomic(out_dir / f"{name}.csv", df.to_csv(index=False, lineterminator="\n")),
            write_text_atomic(out_dir / f"{name}.md", to_markdown(df)),
            write_text_atomic(out_dir / f"{name}.tex", to_latex(df, CAPTIONS[name], f"tab:{name}")),
        ]
    return written
