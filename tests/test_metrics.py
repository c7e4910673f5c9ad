"""Paper metrics (OP, OG, OL, ratio) and loyalty, against values computed by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from effivlm.metrics import (
    loyalty,
    normalise_prediction,
    overall_generalization,
    overall_loyalty,
    overall_performance,
    retained_ratio,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red.", "red"),
        ("  red  ", "red"),
        ("RED", "red"),
        ('"Red."', "red"),
        ("(A)", "a"),
        ("a big   red\n ball!", "a big red ball"),
        ("3.5", "3.5"),
        ("-1", "-1"),
        ("", ""),
    ],
)
def test_normalise_prediction(text: str, expected: str) -> None:
    assert normalise_prediction(text) == expected


def test_normalise_prediction_rejects_non_text() -> None:
    with pytest.raises(ValueError, match="None"):
        normalise_prediction(None)  # type: ignore[arg-type]


def test_loyalty_ignores_case_spacing_and_punctuation() -> None:
    dense = {0: "red", 1: "Blue", 2: "green", 3: "a square"}
    preds = {0: "Red.", 1: " blue ", 2: "yellow", 3: "A  square!"}
    assert loyalty(preds, dense) == 3 / 4


def test_loyalty_of_dense_with_itself_is_one() -> None:
    dense = {i: f"answer {i}" for i in range(5)}
    assert loyalty(dense, dict(dense)) == 1.0


def test_loyalty_names_missing_doc_ids() -> None:
    with pytest.raises(
        ValueError, match=r"missing from the compressed predictions: 2.*missing from the dense"
    ):
        loyalty({0: "a", 1: "b", 7: "c"}, {0: "a", 1: "b", 2: "c"})


def test_loyalty_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        loyalty({}, {})


def test_retained_ratio_and_zero_dense() -> None:
    assert retained_ratio(0.4, 0.8) == 0.5
    assert math.isnan(retained_ratio(0.4, 0.0))
    assert math.isnan(retained_ratio(0.0, 0.0))


def test_overall_performance_is_rms_not_mean() -> None:
    assert overall_performance([0.5, 1.0]) == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert overall_performance([0.5, 1.0]) != pytest.approx(0.75)
    assert overall_performance([1.0, 1.0, 1.0]) == 1.0


def test_overall_performance_skips_undefined_ratios() -> None:
    assert overall_performance([0.5, math.nan, 1.0]) == pytest.approx(math.sqrt(0.625))
    assert math.isnan(overall_performance([math.nan]))
    with pytest.raises(ValueError, match="empty"):
        overall_performance([])
    with pytest.raises(ValueError, match="infinite"):
        overall_performance([1.0, math.inf])


def test_overall_generalization_wide_and_long() -> None:
    # tasks x models; model-averaged ratios per task: t1 = 0.5, t2 = 1.0 -> mean 0.75, population std 0.25
    wide = pd.DataFrame({"m1": [0.4, 1.0], "m2": [0.6, 1.0]}, index=["t1", "t2"])
    expected = 100 * 0.25 / 0.75
    assert overall_generalization(wide) == pytest.approx(expected)
    long = wide.stack().rename_axis(["task", "model"]).rename("ratio").reset_index()
    assert overall_generalization(long) == pytest.approx(expected)


def test_overall_generalization_degenerate() -> None:
    assert overall_generalization(pd.DataFrame({"m": [1.0, 1.0]}, index=["a", "b"])) == 0.0
    assert math.isnan(overall_generalization(pd.DataFrame({"m": [0.0, 0.0]}, index=["a", "b"])))
    with pytest.raises(ValueError, match="empty"):
        overall_generalization(pd.DataFrame())


def test_overall_loyalty_is_mean_percent() -> None:
    assert overall_loyalty([0.9, 0.8, 1.0]) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="95.0"):
        overall_loyalty([95.0, 0.9])
