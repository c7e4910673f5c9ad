"""Paired bootstrap intervals and flip counts, on hand-made arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from effivlm.metrics import (
    flip_counts,
    is_right,
    loyalty_interval,
    loyalty_replicates,
    overall_loyalty_interval,
    overall_performance_interval,
    paired_bootstrap,
    ratio_interval,
    ratio_replicates,
)
from effivlm.metrics.stats import bootstrap_indices, derive_seed, percentile_interval, resampled_means


def mean_ratio(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    return c.mean(axis=-1) / d.mean(axis=-1)


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    dense = (rng.random(200) < 0.7).astype(float)
    comp = np.where(rng.random(200) < 0.85, dense, 1.0 - dense)  # 15% of answers flipped
    return comp, dense


def test_identical_arrays_collapse_to_the_point_value(scores: tuple[np.ndarray, np.ndarray]) -> None:
    _, dense = scores
    assert ratio_interval(dense, dense, n_boot=200) == (1.0, 1.0)
    assert paired_bootstrap(dense, dense, lambda c, d: c.mean(-1) - d.mean(-1), n_boot=200) == (0.0, 0.0)
    const = np.full(50, 0.25)
    lo, hi = paired_bootstrap(const, np.ones(50), mean_ratio, n_boot=200)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_all_agree_loyalty_is_exactly_one() -> None:
    assert loyalty_interval(np.ones(37, dtype=bool)) == (1.0, 1.0)
    assert loyalty_interval(np.zeros(37, dtype=bool)) == (0.0, 0.0)


def test_flips_counted_by_hand() -> None:
    dense = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=float)
    comp = np.array([1, 0, 1, 1, 0, 0, 1, 1], dtype=float)
    # lost: samples 1 and 4 (dense right, compressed wrong); gained: sample 3
    assert flip_counts(is_right(comp), is_right(dense)) == (2, 1)
    assert flip_counts(is_right(dense), is_right(dense)) == (0, 0)
    # partial credit: right means score >= 0.5
    assert is_right(np.array([0.0, 0.49, 0.5, 0.9, 1.0])).tolist() == [False, False, True, True, True]


def test_flips_refuse_scores_and_bad_scales() -> None:
    with pytest.raises(ValueError, match="boolean"):
        flip_counts(np.array([1.0, 0.0]), np.array([True, False]))
    with pytest.raises(ValueError, match="differ in length"):
        flip_counts(np.array([True]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"\[0, 1\].*42"):
        is_right(np.array([0.5, 42.0]))


def test_vectorised_bootstrap_matches_a_slow_loop(scores: tuple[np.ndarray, np.ndarray]) -> None:
    comp, dense = scores
    n_boot, seed, alpha = 300, 7, 0.1
    rng = np.random.default_rng(seed)  # the same draws: one (n_boot, n) matrix from default_rng(seed)
    draws = rng.integers(0, comp.size, size=(n_boot, comp.size))
    slow = []
    for b in range(n_boot):
        idx = draws[b]
        slow.append(comp[idx].sum() / dense[idx].sum())
    expected = np.percentile(slow, [100 * alpha / 2, 100 * (1 - alpha / 2)])

    assert paired_bootstrap(comp, dense, mean_ratio, n_boot, seed, alpha) == pytest.approx(expected)
    assert ratio_replicates(comp, dense, n_boot, seed) == pytest.approx(np.array(slow))
    assert ratio_interval(comp, dense, n_boot, seed, alpha) == pytest.approx(expected)

    agree = comp == dense
    slow_loyalty = [agree[draws[b]].mean() for b in range(n_boot)]
    assert loyalty_replicates(agree, n_boot, seed) == pytest.approx(np.array(slow_loyalty))

    # OP / OL over two tasks: recompute each task's value per replicate, then RMS / mean across tasks
    other_c, other_d = comp[:120], dense[:120]
    seed2 = seed + 1
    draws2 = np.random.default_rng(seed2).integers(0, 120, size=(n_boot, 120))
    op_slow, ol_slow = [], []
    for b in range(n_boot):
        r1 = comp[draws[b]].mean() / dense[draws[b]].mean()
        r2 = other_c[draws2[b]].mean() / other_d[draws2[b]].mean()
        op_slow.append(math.sqrt((r1**2 + r2**2) / 2))
        ol_slow.append(100 * (agree[draws[b]].mean() + (other_c == other_d)[draws2[b]].mean()) / 2)
    ratios = np.column_stack(
        [ratio_replicates(comp, dense, n_boot, seed), ratio_replicates(other_c, other_d, n_boot, seed2)]
    )
    loyalties = np.column_stack(
        [loyalty_replicates(agree, n_boot, seed), loyalty_replicates(other_c == other_d, n_boot, seed2)]
    )
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    assert overall_performance_interval(ratios, alpha) == pytest.approx(np.percentile(op_slow, q))
    assert overall_loyalty_interval(loyalties, alpha) == pytest.approx(np.percentile(ol_slow, q))


def test_deterministic_across_calls_and_seed_dependent(scores: tuple[np.ndarray, np.ndarray]) -> None:
    comp, dense = scores
    first = ratio_interval(comp, dense)
    assert ratio_interval(comp, dense) == first
    assert paired_bootstrap(comp, dense, mean_ratio) == paired_bootstrap(comp, dense, mean_ratio)
    assert ratio_interval(comp, dense, seed=1) != first
    assert (bootstrap_indices(10, 5, 3) == bootstrap_indices(10, 5, 3)).all()
    assert derive_seed(0, "docvqa") == derive_seed(0, "docvqa") != derive_seed(0, "chartqa")


def test_interval_contains_the_point_estimate(scores: tuple[np.ndarray, np.ndarray]) -> None:
    comp, dense = scores
    point = comp.mean() / dense.mean()
    lo, hi = ratio_interval(comp, dense)
    assert lo < point < hi and hi - lo < 0.5
    agree = comp == dense
    lo, hi = loyalty_interval(agree)
    assert lo < agree.mean() < hi
    op = math.sqrt(point**2)
    lo, hi = overall_performance_interval(ratio_replicates(comp, dense)[:, None])
    assert lo < op < hi


def test_zero_dense_resample_gives_a_nan_interval() -> None:
    dense = np.zeros(30)
    dense[0] = 1.0  # one right sample: many resamples miss it, their dense mean is 0
    for comp in (dense, np.ones(30)):  # even 0/0 in the identical case is undefined, never silently 1
        lo, hi = ratio_interval(comp, dense, n_boot=200)
        assert math.isnan(lo) and math.isnan(hi)
    assert np.isnan(ratio_replicates(np.ones(30), dense, n_boot=200)).sum() > 20
    assert all(math.isnan(v) for v in percentile_interval(np.array([0.5, np.nan])))


def test_resampled_means_of_columns_match_each_column() -> None:
    x = np.arange(12, dtype=float).reshape(6, 2)
    both = resampled_means(x, n_boot=50, seed=4)
    assert both.shape == (50, 2)
    assert both[:, 1] == pytest.approx(resampled_means(x[:, 1], n_boot=50, seed=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_boot": 0}, "n_boot"), ({"alpha": 1.5}, "alpha")],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ratio_interval(np.ones(3), np.ones(3), **kwargs)  # type: ignore[arg-type]


def test_unpaired_or_empty_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        ratio_interval(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        loyalty_interval(np.array([], dtype=bool))
    with pytest.raises(ValueError, match="one value per replicate"):
        paired_bootstrap(np.ones(3), np.ones(3), lambda c, d: c, n_boot=5)


def test_paired_replicates_equal_the_separate_ones(scores: tuple[np.ndarray, np.ndarray]) -> None:
    from effivlm.metrics.stats import paired_replicates

    comp, dense = scores
    agree = comp == dense
    ratio, loyal = paired_replicates(comp, dense, agree, 200, 7)
    np.testing.assert_allclose(ratio, ratio_replicates(comp, dense, 200, 7), rtol=1e-12)
    np.testing.assert_allclose(loyal, loyalty_replicates(agree, 200, 7), rtol=1e-12)
