"""VisionZip and PruMerge+ tensor math, against slow loop versions of the algorithms their docstrings describe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effivlm.methods import build_method, kept_count
from effivlm.methods.base import SegmentContext
from effivlm.methods.tokens.prumerge import iqr_outliers, prumerge_merge, prumerge_select, uniform_pick
from effivlm.methods.tokens.visionzip import split_budget, visionzip

# ---------------------------------------------------------------------------- slow references


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def reference_visionzip(features, attention, keys, k):
    """VisionZip as the module docstring tells it, one token at a time: (positions, features (k, D))."""
    n = features.shape[0]
    if k >= n:
        return list(range(n)), features
    contextual_n = int(k / 6.4 + 1e-9)
    dominant_n = k - contextual_n
    by_attention = sorted(range(n), key=lambda i: -float(attention[i]))
    dominant = set(by_attention[:dominant_n])
    remaining = [i for i in range(n) if i not in dominant]  # ascending
    rows = {i: features[i].double() for i in dominant}
    if contextual_n:
        step = max(1, len(remaining) // contextual_n)
        targets = remaining[::step][:contextual_n]
        members = {t: [t] for t in targets}
        for j in remaining:
            if j in members:
                continue
            best = max(targets, key=lambda t, j=j: cosine(keys[j], keys[t]))
            members[best].append(j)
        for t, group in members.items():
            rows[t] = sum(features[i].double() for i in group) / len(group)
    positions = sorted(rows)
    return positions, torch.stack([rows[i] for i in positions])


def reference_merge(features, attention, keys, kept, neighbours):
    """Each kept token plus its ``neighbours`` most key-similar other tokens, weighted by attention share."""
    n = features.shape[0]
    share = attention.double() / attention.double().sum()
    out = []
    for i in kept.tolist():
        others = sorted((j for j in range(n) if j != i), key=lambda j, i=i: -cosine(keys[i], keys[j]))
        row = features[i].double().clone()
        for j in others[:neighbours]:
            row += share[j] * features[j].double()
        out.append(row)
    return torch.stack(out)


def reference_outliers(scores: torch.Tensor) -> list[int]:
    values = scores.double().numpy()
    q1, q3 = np.quantile(values, [0.25, 0.75])  # linear interpolation
    above = [i for i, v in enumerate(values) if v > q3 + 1.5 * (q3 - q1)]
    return sorted(above, key=lambda i: -values[i])


def random_segment(n, d=12, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    attention = torch.rand(n, generator=g)
    attention = attention / attention.sum()
    keys = torch.randn(n, c, generator=g)
    return features, attention, keys


def with_outliers(n, outliers, seed=0):
    """Attention of ``n`` tokens, uniform in [0, 1) except ``outliers`` tokens at 5 + uniform: (scores, outlier set)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g)
    planted = torch.randperm(n, generator=g)[:outliers]
    scores[planted] = 5 + torch.rand(outliers, generator=g)
    return scores, set(planted.tolist())


# ---------------------------------------------------------------------------- VisionZip


@pytest.mark.parametrize(("k", "split"), [(64, (54, 10)), (192, (162, 30)), (128, (108, 20)), (1, (1, 0))])
def test_split_budget_is_the_papers(k, split):
    assert split_budget(k) == split


def test_split_budget_adds_up():
    for k in range(1, 1000):
        dominant, contextual = split_budget(k)
        assert dominant + contextual == k
        assert contextual == int(k / 6.4 + 1e-9) and dominant >= 1


@pytest.mark.parametrize(("n", "k"), [(16, 1), (16, 6), (16, 7), (36, 15), (64, 13), (100, 40), (50, 49)])
@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_matches_the_loop_reference(n, k, seed):
    features, attention, keys = random_segment(n, seed=seed)
    positions, kept = visionzip(features, attention, keys, k)
    want_positions, want = reference_visionzip(features, attention, keys, k)
    assert positions.tolist() == want_positions
    assert kept.dtype == features.dtype and kept.shape == (k, features.shape[1])
    torch.testing.assert_close(kept.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("n", "k"), [(16, 7), (36, 15), (64, 13), (729, 73)])
def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest(n, k):
    features, attention, keys = random_segment(n, seed=n + k)
    positions, kept = visionzip(features, attention, keys, k)
    assert positions.dtype == torch.long
    assert positions.tolist() == sorted(set(positions.tolist())) and positions.numel() == k
    dominant_n, contextual_n = split_budget(k)
    dominant = set(torch.topk(attention, dominant_n).indices.tolist())
    assert dominant <= set(positions.tolist())
    row = {p: i for i, p in enumerate(positions.tolist())}
    for p in dominant:
        assert torch.equal(kept[row[p]], features[p])
    # each contextual token is the mean of its target and the others nearest to it
    targets = [p for p in positions.tolist() if p not in dominant]
    assert len(targets) == contextual_n
    others = [i for i in range(n) if i not in dominant and i not in targets]
    joined = {t: [t] for t in targets}
    for j in others:
        joined[max(targets, key=lambda t, j=j: cosine(keys[j], keys[t]))].append(j)
    for t, group in joined.items():
        torch.testing.assert_close(kept[row[t]], features[group].mean(0), atol=1e-6, rtol=1e-6)
    assert sum(len(g) for g in joined.values()) + dominant_n == n  # every token counted once


def test_visionzip_targets_are_taken_at_a_uniform_stride():
    # attention decreasing with the index: the dominant tokens are the first d, the targets strided after them
    n, k = 40, 13  # 11 dominant, 2 contextual; 29 remaining -> stride 14
    features, _, keys = random_segment(n)
    attention = torch.linspace(1.0, 0.0, n)
    positions, _ = visionzip(features, attention, keys, k)
    assert positions.tolist() == [*range(11), 11, 25]


@pytest.mark.parametrize("k", [16, 17, 100])
def test_visionzip_at_full_budget_is_the_identity(k):
    features, attention, keys = random_segment(16)
    positions, kept = visionzip(features, attention, keys, k)
    assert torch.equal(positions, torch.arange(16))
    assert torch.equal(kept, features)


def test_visionzip_keeps_the_feature_dtype():
    features, attention, keys = random_segment(36)
    positions, kept = visionzip(features.to(torch.bfloat16), attention, keys, 12)
    want_positions, want = reference_visionzip(features.to(torch.bfloat16), attention, keys, 12)
    assert kept.dtype == torch.bfloat16
    assert positions.tolist() == want_positions
    torch.testing.assert_close(kept.double(), want.to(torch.bfloat16).double())


# ---------------------------------------------------------------------------- PruMerge+


@pytest.mark.parametrize(("n", "outliers"), [(50, 0), (50, 3), (100, 10), (729, 20), (9, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iqr_outliers_match_numpy_quantiles(n, outliers, seed):
    scores, planted = with_outliers(n, outliers, seed=seed)
    got = iqr_outliers(scores).tolist()
    assert got == reference_outliers(scores)
    assert planted <= set(got)
    assert [float(scores[i]) for i in got] == sorted((float(scores[i]) for i in got), reverse=True)


def test_iqr_outliers_on_skewed_data():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        scores = torch.rand(200, generator=g) ** 6  # a long right tail
        assert iqr_outliers(scores).tolist() == reference_outliers(scores)


def test_iqr_outliers_of_constant_scores_are_none():
    assert iqr_outliers(torch.full((10,), 0.1)).numel() == 0


@pytest.mark.parametrize("size", [1, 5, 16, 37])
def test_uniform_pick_is_sorted_distinct_and_strided(size):
    candidates = torch.tensor(sorted(torch.randperm(200)[:size].tolist()))
    assert uniform_pick(candidates, 0).numel() == 0
    assert uniform_pick(candidates, -1).numel() == 0
    for m in range(1, size + 1):
        picked = uniform_pick(candidates, m).tolist()
        assert len(picked) == m == len(set(picked))
        assert picked == sorted(picked) and set(picked) <= set(candidates.tolist())
        assert picked == [int(candidates[i * size // m]) for i in range(m)]
    assert torch.equal(uniform_pick(candidates, size), candidates)


@pytest.mark.parametrize(
    ("n", "outliers", "k"), [(50, 3, 10), (50, 10, 10), (100, 1, 1), (729, 20, 73), (36, 0, 4)]
)
def test_prumerge_select_keeps_the_outliers_padded_uniformly(n, outliers, k):
    scores, planted = with_outliers(n, outliers, seed=n + k)
    assert set(reference_outliers(scores)) == planted
    kept = prumerge_select(scores, k).tolist()
    assert kept == sorted(set(kept)) and len(kept) == k
    assert planted <= set(kept)
    # the padding is the uniform stride over the tokens that are not outliers
    free = [i for i in range(n) if i not in planted]
    pad = k - len(planted)
    assert set(kept) - planted == {free[i * len(free) // pad] for i in range(pad)}


def test_prumerge_select_with_more_outliers_than_budget_keeps_the_highest():
    scores, planted = with_outliers(100, 12, seed=3)
    assert len(reference_outliers(scores)) == 12
    kept = prumerge_select(scores, 5).tolist()
    highest = sorted(planted, key=lambda i: -float(scores[i]))[:5]
    assert kept == sorted(highest)


@pytest.mark.parametrize(
    ("n", "k", "neighbours"), [(16, 4, 3), (36, 8, 32), (10, 3, 9), (10, 3, 50), (50, 5, 1)]
)
def test_prumerge_merge_matches_the_loop_reference(n, k, neighbours):
    features, attention, keys = random_segment(n, seed=k)
    kept = prumerge_select(attention, k)
    got = prumerge_merge(features, attention, keys, kept, neighbours)
    assert got.dtype == features.dtype and got.shape == (k, features.shape[1])
    want = reference_merge(features, attention, keys, kept, neighbours)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_prumerge_merge_weights_are_attention_shares():
    # unnormalised attention: the weights are its shares, not the raw values
    features, attention, keys = random_segment(20, seed=9)
    kept = torch.tensor([2, 11])
    got = prumerge_merge(features, attention * 37.0, keys, kept, 4)
    torch.testing.assert_close(got, prumerge_merge(features, attention, keys, kept, 4), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        got.double(), reference_merge(features, attention, keys, kept, 4), atol=1e-5, rtol=1e-5
    )


def test_a_token_is_not_its_own_neighbour():
    # token 0's key is its own closest match; with one neighbour it absorbs token 1 (the same direction)
    features = torch.eye(4)
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    attention = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = prumerge_merge(features, attention, keys, torch.tensor([0]), 1)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.2, 0.0, 0.0]]))


# ---------------------------------------------------------------------------- through the method classes


def segment_context(n, seed=0):
    features, attention, keys = random_segment(n, d=16, c=8, seed=seed)
    side = int(n**0.5)
    grid = (side, side) if side * side == n else None
    return SegmentContext(features, grid, 0, 0, 0, attention=attention, keys=keys)


@pytest.mark.parametrize("name", ["visionzip", "prumerge_plus"])
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.4, 1.0])
@pytest.mark.parametrize("n", [1, 7, 16, 36, 729])
def test_methods_keep_the_budgeted_count(name, budget, n):
    ctx = segment_context(n, seed=n)
    red = build_method(name, budget).reduce(ctx)
    k = kept_count(budget, n)
    assert red.positions.shape == (k,) and red.features.shape == (k, 16)
    assert red.positions.tolist() == sorted(set(red.positions.tolist()))
    assert int(red.positions.min()) >= 0 and int(red.positions.max()) < n
    assert red.features.dtype == ctx.features.dtype
    if k == n:
        assert torch.equal(red.features, ctx.features)
        assert torch.equal(red.positions, torch.arange(n))


@pytest.mark.parametrize("n", [16, 36])
def test_methods_are_their_tensor_functions(n):
    ctx = segment_context(n, seed=3)
    k = kept_count(0.4, n)
    red = build_method("visionzip", 0.4).reduce(ctx)
    positions, features = reference_visionzip(ctx.features, ctx.attention, ctx.keys, k)
    assert red.positions.tolist() == positions
    torch.testing.assert_close(red.features.double(), features, atol=1e-6, rtol=1e-6)
    red = build_method("prumerge_plus", 0.4, {"neighbours": 5}).reduce(ctx)
    kept = prumerge_select(ctx.attention, k)
    assert torch.equal(red.positions, kept)
    torch.testing.assert_close(
        red.features.double(),
        reference_merge(ctx.features, ctx.attention, ctx.keys, kept, 5),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("neighbours", [0, -3, 2.5, True, "4"])
def test_prumerge_neighbours_must_be_a_positive_integer(neighbours):
    with pytest.raises(ValueError, match="neighbours"):
        build_method("prumerge_plus", 0.1, {"neighbours": neighbours})
