"""Paired bootstrap intervals and flip counts for compressed-vs-dense comparisons, as pure numpy functions.

A compressed model and its dense reference answer the same samples, so their per-sample scores are resampled
together: one draw of sample indices (with replacement) serves both arrays (a paired bootstrap). Every
function draws the whole (n_boot, n) index matrix at once from ``np.random.default_rng(seed)``, so a result
is a deterministic function of the data and the seed.

Intervals are percentile intervals: the alpha/2 and 1 - alpha/2 quantiles (numpy's linear interpolation) of
the statistic over the bootstrap replicates. When any replicate is NaN (an undefined ratio, a missing score),
the interval is (NaN, NaN): it is never silently computed from the replicates that happened to be defined.

Aggregates (OP, OL) are bootstrapped task by task: each task's samples are resampled with the task's own
index matrix, the task's ratio or loyalty is recomputed per replicate (``ratio_replicates``,
``loyalty_replicates``), and the aggregate is recomputed per replicate from those columns
(``overall_performance_interval``, ``overall_loyalty_interval``). Giving the same task the same seed for
every model and method (``derive_seed(seed, task)``) resamples the same documents for all of them, so
intervals of different rows are paired too.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np

N_BOOT = 1000
SEED = 0
ALPHA = 0.05
RIGHT_THRESHOLD = 0.5

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _check_common(n_boot: int, alpha: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _vector(values: np.ndarray, what: str, dtype: type = float) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: nothing to resample")
    return arr


def _paired(compressed: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, d = _vector(compressed, "compressed"), _vector(dense, "dense")
    if c.shape != d.shape:
        raise ValueError(f"paired arrays differ in length: compressed {c.size}, dense {d.size}")
    return c, d


def derive_seed(seed: int, *names: str) -> int:
    """A seed for one named stream (a task), stable across runs and Python versions (no ``hash()``)."""
    words = [int(seed)] + [zlib.crc32(name.encode("utf-8")) for name in names]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """The (n_boot, n) matrix of resampled sample indices, drawn in one call from ``default_rng(seed)``."""
    _check_common(n_boot, ALPHA)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


@lru_cache(maxsize=32)
def _counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each sample is drawn in each replicate, (n_boot, n) float, from ``bootstrap_indices``.

    A replicate's mean of x is then counts @ x / n: one matrix product instead of an (n_boot, n) gather per
    array. Cached (read-only) because every job of a task shares its task's draws.
    """
    idx = bootstrap_indices(n, n_boot, seed)  # (B, n)
    flat = idx + (np.arange(n_boot) * n)[:, None]  # row b's indices shifted into [b*n, (b+1)*n)
    counts = np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)
    counts.flags.writeable = False
    return counts


def resampled_means(values: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """Mean of ``values`` (n,) or of each column of (n, k) in every replicate: (n_boot,) or (n_boot, k)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim not in (1, 2) or arr.shape[0] == 0:
        raise ValueError(f"values must be a non-empty (n,) or (n, k) array, got shape {arr.shape}")
    _check_common(n_boot, ALPHA)
    return _counts(arr.shape[0], int(n_boot), int(seed)) @ arr / arr.shape[0]


def percentile_interval(replicates: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """(alpha/2, 1 - alpha/2) percentiles of the replicates; (NaN, NaN) when any replicate is NaN."""
    _check_common(1, alpha)
    reps = np.asarray(replicates, dtype=float).ravel()
    if reps.size == 0 or np.isnan(reps).any():
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def paired_bootstrap(
    compressed: np.ndarray,
    dense: np.ndarray,
    statistic: Statistic,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    alpha: float = ALPHA,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(compressed[idx], dense[idx])`` over paired resamples.

    ``statistic`` is called once on two (n_boot, n) arrays (row b is replicate b, the same indices in both)
    and must reduce along the last axis to (n_boot,), e.g. ``lambda c, d: c.mean(-1) - d.mean(-1)``.
    """
    c, d = _paired(compressed, dense)
    _check_common(n_boot, alpha)
    idx = bootstrap_indices(c.size, n_boot, seed)  # (B, n)
    reps = np.asarray(statistic(c[idx], d[idx]), dtype=float)
    if reps.shape != (n_boot,):
        raise ValueError(
            f"statistic must return one value per replicate, shape ({n_boot},), got {reps.shape}"
        )
    return percentile_interval(reps, alpha)


def ratio_replicates(
    comp_scores: np.ndarray, dense_scores: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED
) -> np.ndarray:
    """mean(compressed) / mean(dense) in every paired replicate, (n_boot,); NaN where the dense mean is 0."""
    c, d = _paired(comp_scores, dense_scores)
    means = resampled_means(np.stack([c, d], axis=1), n_boot, seed)  # (B, 2)
    num, den = means[:, 0], means[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.nan, num / np.where(den == 0, 1.0, den))


def paired_replicates(
    comp_scores: np.ndarray,
    dense_scores: np.ndarray,
    agree: np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """``ratio_replicates`` and ``loyalty_replicates`` of one job in one pass over the resampling counts (the
    same draws, so the same values; the counts matrix is read once instead of twice, which is what the
    aggregation of thousands of jobs spends its time on)."""
    c, d = _paired(comp_scores, dense_scores)
    a = _vector(agree, "agree", dtype=bool)
    if a.shape != c.shape:
        raise ValueError(f"agree has {a.size} samples, the scores {c.size}")
    means = resampled_means(np.stack([c, d, a.astype(float)], axis=1), n_boot, seed)  # (B, 3)
    num, den = means[:, 0], means[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den == 0, np.nan, num / np.where(den == 0, 1.0, den))
    return ratio, means[:, 2]


def ratio_interval(
    comp_scores: np.ndarray,
    dense_scores: np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    alpha: float = ALPHA,
) -> tuple[float, float]:
    """Interval of the retained ratio mean(c) / mean(d) (paired bootstrap).

    (NaN, NaN) when a resample's dense mean is 0 (that replicate's ratio is undefined, and dropping it would
    bias the interval upwards) or when a score is NaN. A dense model with few correct samples hits this:
    with k of n right, a replicate draws none of them with probability about exp(-k).
    """
    _check_common(n_boot, alpha)
    return percentile_interval(ratio_replicates(comp_scores, dense_scores, n_boot, seed), alpha)


def loyalty_replicates(agree: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """Share of agreeing samples in every replicate, (n_boot,)."""
    arr = _vector(agree, "agree", dtype=bool)
    return resampled_means(arr.astype(float), n_boot, seed)


def loyalty_interval(
    agree: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED, alpha: float = ALPHA
) -> tuple[float, float]:
    """Interval of loyalty (a share in [0, 1]) from per-sample agreement with the dense prediction."""
    _check_common(n_boot, alpha)
    return percentile_interval(loyalty_replicates(agree, n_boot, seed), alpha)


def _columns(replicates: np.ndarray, what: str) -> np.ndarray:
    reps = np.asarray(replicates, dtype=float)
    if reps.ndim == 1:
        reps = reps[:, None]
    if reps.ndim != 2 or reps.shape[0] == 0 or reps.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (n_boot, tasks) array, got shape {reps.shape}")
    return reps


def overall_performance_interval(ratio_reps: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """Interval of OP from per-task ratio replicates, (n_boot, tasks): RMS over tasks in every replicate.

    Pass only the tasks OP itself uses (defined ratios); a NaN replicate in any of them gives (NaN, NaN).
    """
    reps = _columns(ratio_reps, "ratio_reps")
    return percentile_interval(np.sqrt(np.mean(reps**2, axis=1)), alpha)


def overall_loyalty_interval(loyalty_reps: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """Interval of OL in % from per-task loyalty replicates (shares), (n_boot, tasks): mean over tasks."""
    reps = _columns(loyalty_reps, "loyalty_reps")
    return percentile_interval(100.0 * np.mean(reps, axis=1), alpha)


def is_right(scores: np.ndarray, threshold: float = RIGHT_THRESHOLD) -> np.ndarray:
    """Per-sample correctness on a [0, 1] metric: a sample is right when its score >= 0.5.

    For exact-match style 0/1 scores this is score == 1; for partial-credit scores (ANLS, relaxed accuracy)
    it counts a sample as right when it earns at least half the credit. Raises ValueError for scores outside
    [0, 1] or NaN, where "right" has no meaning (summed or 0-100 scales).
    """
    arr = _vector(scores, "scores")
    bad = arr[np.isnan(arr) | (arr < 0) | (arr > 1)]
    if bad.size:
        raise ValueError(f"scores must lie in [0, 1] to count flips, got {bad[:5].tolist()}")
    return arr >= threshold


def flip_counts(comp_correct: np.ndarray, dense_correct: np.ndarray) -> tuple[int, int]:
    """(lost, gained): samples the dense model gets right and the compressed wrong, and the reverse.

    Both arguments are boolean per-sample correctness, paired by position (see ``is_right``).
    """
    c, d = np.asarray(comp_correct), np.asarray(dense_correct)
    for what, arr in (("comp_correct", c), ("dense_correct", d)):
        if arr.dtype != bool or arr.ndim != 1:
            raise ValueError(
                f"{what} must be a 1-D boolean array, got dtype {arr.dtype} shape {arr.shape} "
                "(turn scores into correctness with is_right)"
            )
    if c.shape != d.shape:
        raise ValueError(f"paired arrays differ in length: compressed {c.size}, dense {d.size}")
    return int(np.count_nonzero(d & ~c)), int(np.count_nonzero(c & ~d))
