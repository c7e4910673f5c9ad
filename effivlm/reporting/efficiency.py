"""From the efficiency rule's records to the efficiency table and OE (EffiVLM-Bench's efficiency view).

One record per (model, method variant, budget) (``effivlm.efficiency.job``). Every figure is put beside the
dense record of the same model, run with the same settings:

- ``ttft_speedup`` = dense TTFT / TTFT and ``decode_speedup`` = dense decode step / decode step (OE: above 1 the
  method is faster), each with a quartile range (``_lo`` = dense's first quartile over the method's third,
  ``_hi`` = dense's third quartile over the method's first), so that a speedup inside the noise shows as such;
- ``prefill_flops_share``, ``decode_flops_share``, ``peak_memory_share`` and ``kv_share``: the method's figure over
  dense's (below 1 the method saves).

Overall rows (model "overall") take the geometric mean over models of each ratio, the natural mean of ratios.
Only :func:`load_efficiency` touches the file system.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DENSE_METHOD = "dense"
OVERALL = "overall"
_REQUIRED = (
    "model",
    "method",
    "method_name",
    "budget",
    "settings",
    "ttft",
    "decode",
    "tokens_per_s",
    "peak_memory_bytes",
    "kv_bytes",
    "kv_bytes_dense",
    "prefill_flops",
    "decode_flops",
)
#: ratio column -> (figure, higher is better)
RATIOS = {
    "ttft_speedup": ("ttft_ms", True),
    "decode_speedup": ("decode_ms", True),
    "prefill_flops_share": ("prefill_flops", False),
    "decode_flops_share": ("decode_flops", False),
    "peak_memory_share": ("peak_memory_bytes", False),
    "kv_share": ("kv_bytes", False),
}
EFFICIENCY_COLUMNS = [
    "model",
    "family",
    "method",
    "method_name",
    "budget",
    "weights",
    "backbone",
    "device",
    "ttft_ms",
    "ttft_q1_ms",
    "ttft_q3_ms",
    "decode_ms",
    "decode_q1_ms",
    "decode_q3_ms",
    "tokens_per_s",
    "peak_memory_bytes",
    "kv_bytes",
    "prefill_flops",
    "decode_flops",
    "prompt_tokens",
    "visual_kept",
    "ttft_speedup",
    "ttft_speedup_lo",
    "ttft_speedup_hi",
    "decode_speedup",
    "decode_speedup_lo",
    "decode_speedup_hi",
    "prefill_flops_share",
    "decode_flops_share",
    "peak_memory_share",
    "kv_share",
]
#: the columns the summary table takes from here
OE_COLUMNS = [
    "ttft_speedup",
    "decode_speedup",
    "prefill_flops_share",
    "decode_flops_share",
    "peak_memory_share",
    "kv_share",
]


class EfficiencyError(ValueError):
    """A bad efficiency record; the message is one line naming the file."""


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EfficiencyError(f"{path}: efficiency record is missing (did its job run?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EfficiencyError(f"{path}: not a readable efficiency record ({err})") from None
    if not isinstance(record, dict):
        raise EfficiencyError(f"{path}: an efficiency record must be a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise EfficiencyError(f"{path}: efficiency record lacks {', '.join(missing)}")
    return record


def _row(record: dict[str, Any], path: Path) -> dict[str, Any]:
    ttft, decode = record["ttft"], record["decode"]
    return {
        "model": record["model"],
        "family": record.get("family", ""),
        "method": record["method"],
        "method_name": record["method_name"],
        "budget": float(record["budget"]),
        "weights": record.get("weights") or "",
        "backbone": record["settings"].get("backbone", ""),
        "device": record.get("device", ""),
        "ttft_ms": float(ttft["median"]),
        "ttft_q1_ms": float(ttft["q1"]),
        "ttft_q3_ms": float(ttft["q3"]),
        "decode_ms": float(decode["median"]),
        "decode_q1_ms": float(decode["q1"]),
        "decode_q3_ms": float(decode["q3"]),
        "tokens_per_s": float(record["tokens_per_s"]),
        "peak_memory_bytes": float(record["peak_memory_bytes"] or math.nan),
        "kv_bytes": float(record["kv_bytes"]),
        "prefill_flops": float(record["prefill_flops"]),
        "decode_flops": float(record["decode_flops"]),
        "prompt_tokens": int(record.get("prompt_tokens", 0)),
        "visual_kept": int(record.get("visual_kept", 0)),
        "settings": json.dumps(record["settings"], sort_keys=True),
        "path": str(path),
    }


def load_efficiency(paths: Sequence[Path | str]) -> pd.DataFrame:
    """One row per record file (EfficiencyError naming the file for a bad one)."""
    rows = []
    for path in map(Path, paths):
        rows.append(_row(_read(path), path))
    return pd.DataFrame(rows)


def _ratio(num: pd.Series | float, den: pd.Series | float) -> np.ndarray:
    """num / den, elementwise, NaN where den is not positive (a scalar broadcasts)."""
    n, d = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)


def build_efficiency_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Every record beside its model's dense record, plus "overall" rows (geometric mean over models).

    EfficiencyError when a model has no dense record, when records of one model were run with different
    settings (their timings would not compare), or when a (model, method, budget) appears twice.
    """
    if rows.empty:
        return pd.DataFrame(columns=EFFICIENCY_COLUMNS)
    dup = rows[rows.duplicated(["model", "method", "budget"], keep=False)]
    if not dup.empty:
        raise EfficiencyError(f"{dup['path'].iloc[1]}: duplicate efficiency record of {dup['path'].iloc[0]}")
    out = []
    for model, group in rows.groupby("model", sort=True):
        dense = group[(group["method"] == DENSE_METHOD) & (group["budget"] == 1.0)]
        if dense.empty:
            raise EfficiencyError(
                f"{group['path'].iloc[0]}: model '{model}' has no dense efficiency record to compare with"
            )
        other = group[group["settings"] != dense["settings"].iloc[0]]
        if not other.empty:
            raise EfficiencyError(
                f"{other['path'].iloc[0]}: efficiency settings differ from the dense record's "
                f"({dense['path'].iloc[0]}); rerun it with the same settings"
            )
        ref = dense.iloc[0]
        group = group.copy()
        for name, (figure, faster) in RATIOS.items():
            group[name] = _ratio(ref[figure], group[figure]) if faster else _ratio(group[figure], ref[figure])
        for name in ("ttft", "decode"):
            group[f"{name}_speedup_lo"] = _ratio(ref[f"{name}_q1_ms"], group[f"{name}_q3_ms"])
            group[f"{name}_speedup_hi"] = _ratio(ref[f"{name}_q3_ms"], group[f"{name}_q1_ms"])
        out.append(group)
    table = pd.concat(out, ignore_index=True)
    overall = []
    for (method, budget), group in table.groupby(["method", "budget"], sort=True):
        row: dict[str, Any] = {
            "model": OVERALL,
            "method": method,
            "method_name": group["method_name"].iloc[0],
            "budget": budget,
            "weights": group["weights"].iloc[0],
        }
        for name in [*RATIOS, "ttft_speedup_lo", "ttft_speedup_hi", "decode_speedup_lo", "decode_speedup_hi"]:
            row[name] = geometric_mean(group[name])
        overall.append(row)
    table = pd.concat([table, pd.DataFrame(overall)], ignore_index=True)
    table["_overall"] = table["model"] == OVERALL
    table = table.sort_values(["_overall", "model", "method", "budget"], kind="stable")
    return table.reindex(columns=EFFICIENCY_COLUMNS).reset_index(drop=True)


def geometric_mean(values: pd.Series) -> float:
    """exp(mean(log x)) of the positive, defined values; NaN when any value is undefined or none is left."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.isnan(arr).any() or (arr <= 0).any():
        return math.nan
    return float(np.exp(np.log(arr).mean()))


def with_efficiency(summary: pd.DataFrame, efficiency: pd.DataFrame) -> pd.DataFrame:
    """The summary with the OE columns of its (model, method, budget), NaN where nothing was profiled."""
    keys = ["model", "method", "budget"]
    summary = summary.drop(columns=[c for c in OE_COLUMNS if c in summary])
    if efficiency.empty:
        return summary.assign(**{c: math.nan for c in OE_COLUMNS})
    merged = summary.merge(efficiency[keys + OE_COLUMNS], on=keys, how="left", validate="one_to_one")
    return merged
