"""Loyalty: how often a compressed model answers exactly as its dense model does (EffiVLM-Bench, OL).

The paper counts a sample as loyal when the compressed prediction equals the dense prediction. Generated
answers differ in case, spacing and trailing punctuation without meaning anything ("Red." vs "red"), so
both sides are normalised first; nothing else (no number parsing, no synonym matching) is done.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping

# Stripped from the start of an answer: quotes and opening brackets. A leading "-", "+" or "$" is kept,
# because "-1" and "1" are different answers.
_LEADING = "\"'`([{<“‘«*"
# Stripped from the end: quotes, closing brackets and sentence punctuation (the trailing period included).
_TRAILING = "\"'`)]}>”’»*.,;:!?"
_WHITESPACE = re.compile(r"\s+")


def normalise_prediction(text: str) -> str:
    """Lowercase, collapse whitespace and strip surrounding quotes/brackets and trailing punctuation.

    >>> normalise_prediction("  Red. ")
    'red'
    >>> normalise_prediction('"(A)"')
    'a'
    """
    if not isinstance(text, str):
        raise ValueError(f"prediction must be a string, got {type(text).__name__} {text!r}")
    out = _WHITESPACE.sub(" ", text.lower()).strip()
    previous = None
    while out != previous:  # "('red.')" needs several passes: brackets, quotes, then the period
        previous = out
        out = out.lstrip(_LEADING).rstrip(_TRAILING).strip()
    return out


def _preview(ids: set[Hashable], limit: int = 10) -> str:
    shown = sorted(ids, key=repr)[:limit]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in shown) + more


def loyalty(preds: Mapping[Hashable, str], dense_preds: Mapping[Hashable, str]) -> float:
    """Share (in [0, 1]) of samples whose normalised prediction equals the dense model's, paired by doc_id.

    Raises ValueError naming the doc ids present on one side only, or when there are no samples.
    """
    ids, dense_ids = set(preds), set(dense_preds)
    if ids != dense_ids:
        parts = []
        if dense_ids - ids:
            parts.append(f"missing from the compressed predictions: {_preview(dense_ids - ids)}")
        if ids - dense_ids:
            parts.append(f"missing from the dense predictions: {_preview(ids - dense_ids)}")
        raise ValueError("predictions and dense predictions cover different doc ids; " + "; ".join(parts))
    if not ids:
        raise ValueError("loyalty of an empty prediction set is undefined (no samples)")
    same = sum(normalise_prediction(preds[i]) == normalise_prediction(dense_preds[i]) for i in ids)
    return same / len(ids)
