"""The KV-cache methods' tensor math against slow, obviously-correct versions, and every option changing it."""

from __future__ import annotations

import pytest
import torch

from effivlm.methods import KVContext, build_method, kv_capacity
from effivlm.methods.kv.select import (
    allocate_budgets,
    merge_evicted,
    pool_scores,
    pyramid_capacities,
    shared_across_heads,
    text_prior,
    top_with_window,
)


def test_capacity_is_the_floor_of_the_budget_and_at_least_one():
    assert kv_capacity(0.1, 4000) == 400
    assert kv_capacity(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert kv_capacity(0.01, 42) == 1
    assert kv_capacity(0.4, 42) == 16
    assert kv_capacity(1.0, 42) == 42


def test_window_is_a_share_of_the_capacity():
    method = build_method("h2o", 0.1)
    assert method.window_size(400) == 40
    assert method.window_size(4) == 1  # at least one recent entry
    assert build_method("h2o", 0.1, {"window": 0.0}).window_size(400) == 0
    assert build_method("h2o", 0.1, {"window": 1.0}).window_size(400) == 400


def test_top_with_window_keeps_the_window_and_the_best_of_the_rest():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 9.0, 9.0], [0.0, 6.0, 1.0, 7.0, 2.0, 0.0, 0.0]])
    kept = top_with_window(scores, capacity=4, window=2)
    assert kept.tolist() == [[0, 2, 5, 6], [1, 3, 5, 6]]
    assert top_with_window(scores, capacity=7, window=2).tolist() == [list(range(7))] * 2
    assert top_with_window(scores, capacity=2, window=2).tolist() == [[5, 6], [5, 6]]
    shared = top_with_window(shared_across_heads(scores), capacity=4, window=2)
    assert shared[0].tolist() == shared[1].tolist() == [1, 3, 5, 6]  # sums 5, 7, 5, 7, 5: entries 1 and 3


def slow_pool(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    heads, length = scores.shape
    half = kernel // 2
    out = torch.empty_like(scores)
    for h in range(heads):
        for i in range(length):
            window = [float(scores[h, j]) for j in range(i - half, i + half + 1) if 0 <= j < length]
            out[h, i] = max(window) if kind == "max" else sum(window) / kernel  # zero padding counts
    return out


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_pooling_matches_a_slow_version(kind, kernel):
    scores = torch.rand(3, 11, generator=torch.Generator().manual_seed(kernel))
    torch.testing.assert_close(pool_scores(scores, kind, kernel), slow_pool(scores, kind, kernel))


@pytest.mark.parametrize(
    ("heavy", "window", "length", "layers"), [(360, 40, 4000, 4), (15, 1, 42, 3), (23, 2, 42, 28)]
)
def test_pyramid_budgets_decrease_and_keep_the_mean(heavy, window, length, layers):
    caps = pyramid_capacities(heavy, window, length, layers, beta=20)
    assert caps == sorted(caps, reverse=True)
    assert caps[0] - window <= length - window
    assert abs(sum(caps) - layers * (heavy + window)) <= layers * (layers - 1) / 2 + layers
    assert pyramid_capacities(heavy, window, length, layers, beta=2) != caps  # beta matters


def test_pyramid_at_the_reference_numbers():
    # 4 layers, capacity 400 with window 40: min 360 // 20 = 18, max 720 - 18 = 702, step 228
    assert pyramid_capacities(360, 40, 4000, 4, beta=20) == [742, 514, 286, 58]


@pytest.mark.parametrize("total", [9, 30, 100])
def test_allocation_sums_to_the_total_within_bounds_and_follows_the_weights(total):
    weights = [0.9, 0.1, 0.5, 0.5]
    got = allocate_budgets(weights, total, low=2, high=40)
    assert sum(got) == total
    assert all(2 <= g <= 40 for g in got)
    assert got[0] >= got[2] >= got[1]


def test_allocation_spreads_what_a_clamped_layer_cannot_take():
    assert allocate_budgets([100.0, 1.0, 1.0], 30, low=0, high=12) == [12, 9, 9]
    assert allocate_budgets([1.0, 0.0, 0.0], 12, low=3, high=20) == [6, 3, 3]
    with pytest.raises(ValueError, match="cannot split 50 over 3 layers"):
        allocate_budgets([1.0, 1.0, 1.0], 50, low=0, high=12)


def test_text_prior_ranks_every_text_entry_first():
    scores = torch.tensor([[9.0, 0.1, 8.0, 0.2, 7.0]])
    is_image = torch.tensor([True, False, True, False, True])
    ranked = text_prior(scores, is_image)
    assert ranked[0, 1] > ranked[0, 0] and ranked[0, 3] > ranked[0, 0]
    assert ranked[0, 3] > ranked[0, 1] and ranked[0, 0] > ranked[0, 2] > ranked[0, 4]


def slow_merge(keys, values, kept, how):
    heads, length, _ = keys.shape
    new_k, new_v = [], []
    for h in range(heads):
        kk = [keys[h, j].clone() for j in kept[h].tolist()]
        kv = [values[h, j].clone() for j in kept[h].tolist()]
        groups_k = [[k] for k in kk]
        groups_v = [[v] for v in kv]
        for e in range(length):
            if e in kept[h].tolist():
                continue
            sims = [float(torch.nn.functional.cosine_similarity(keys[h, e], k, dim=0)) for k in kk]
            t = max(range(len(sims)), key=lambda i: sims[i])
            if how == "average":
                groups_k[t].append(keys[h, e])
                groups_v[t].append(values[h, e])
            else:  # pivotal: the midpoint of the evicted entry and its pivot
                groups_k[t].append((keys[h, e] + kk[t]) / 2)
                groups_v[t].append((values[h, e] + kv[t]) / 2)
        new_k.append(torch.stack([torch.stack(g).mean(0) for g in groups_k]))
        new_v.append(torch.stack([torch.stack(g).mean(0) for g in groups_v]))
    return torch.stack(new_k), torch.stack(new_v)


@pytest.mark.parametrize("how", ["average", "pivotal"])
def test_merge_matches_a_slow_version(how):
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    kept = torch.tensor([[0, 3, 8], [1, 2, 8]])
    got_k, got_v = merge_evicted(keys, values, kept, how)
    want_k, want_v = slow_merge(keys, values, kept, how)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(got_v, want_v)
    plain_k, plain_v = merge_evicted(keys, values, kept, "none")
    assert torch.equal(plain_k, keys.gather(1, kept[..., None].expand(-1, -1, 4)))
    assert not torch.allclose(plain_k, got_k)


def context(scores: torch.Tensor, capacity: int, window: int, is_image=None, layer: int = 0) -> KVContext:
    heads, length = scores.shape
    g = torch.Generator().manual_seed(1)
    return KVContext(
        keys=torch.randn(heads, length, 4, generator=g),
        values=torch.randn(heads, length, 4, generator=g),
        scores=scores,
        is_image=torch.zeros(length, dtype=torch.bool) if is_image is None else is_image,
        capacity=capacity,
        window=window,
        layer_index=layer,
    )


def test_streamingllm_keeps_sinks_and_the_window():
    kept = build_method("streamingllm", 0.5).select(context(torch.zeros(2, 10), 5, 2)).indices
    assert kept.tolist() == [[0, 1, 2, 8, 9]] * 2


def test_random_kv_is_seeded_by_layer_and_seed_only():
    method = build_method("random_kv", 0.5)
    a = method.select(context(torch.zeros(2, 30), 10, 1, layer=3)).indices
    assert torch.equal(a, method.select(context(torch.zeros(2, 30), 10, 1, layer=3)).indices)
    assert not torch.equal(a, method.select(context(torch.zeros(2, 30), 10, 1, layer=4)).indices)
    assert not torch.equal(
        a,
        build_method("random_kv", 0.5, {"seed": 1})
        .select(context(torch.zeros(2, 30), 10, 1, layer=3))
        .indices,
    )
    assert (a[:, -1] == 29).all()


SCORES = torch.tensor(
    [
        [0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 7.0, 1.0, 1.0],
        [6.0, 0.0, 0.0, 5.0, 0.0, 0.0, 4.0, 0.0, 3.0, 0.0, 1.0, 1.0],
    ]
)


@pytest.mark.parametrize(
    ("method", "on", "off"),
    [
        ("h2o", {"head_adaptive": True}, {"head_adaptive": False}),
        ("snapkv", {"head_adaptive": True}, {"head_adaptive": False}),
        ("snapkv", {"pooling": "avg"}, {"pooling": "max"}),
        ("snapkv", {"kernel": 5}, {"kernel": 1}),
        ("pyramidkv", {"head_adaptive": True}, {"head_adaptive": False}),
        ("vlcache", {"head_adaptive": True}, {"head_adaptive": False}),
        ("lookm", {"merge": "pivotal"}, {"merge": "none"}),
        ("lookm", {"merge": "average"}, {"merge": "pivotal"}),
    ],
)
def test_every_selection_option_changes_the_selection(method, on, off):
    def run(params):
        chosen = build_method(method, 0.5, params).select(context(SCORES, 4, 1))
        return chosen.indices, chosen.keys

    (kept_on, keys_on), (kept_off, keys_off) = run(on), run(off)
    if method == "lookm":
        assert not torch.allclose(keys_on, keys_off)
    else:
        assert not torch.equal(kept_on, kept_off)


def test_layer_budget_options_change_the_budgets():
    sparsity = [0.1, 0.9, 0.5, 0.5]
    adaptive = build_method("vlcache", 0.1).layer_capacities(4000, 4, sparsity)
    uniform = build_method("vlcache", 0.1, {"layer_adaptive": False}).layer_capacities(4000, 4, sparsity)
    assert uniform == [400] * 4
    assert adaptive != uniform and sum(adaptive) == sum(uniform)
    assert adaptive[0] > adaptive[2] == adaptive[3] > adaptive[1]
    pyramid = build_method("pyramidkv", 0.1).layer_capacities(4000, 4, None)
    assert pyramid != build_method("pyramidkv", 0.1, {"beta": 4.0}).layer_capacities(4000, 4, None)
    assert build_method("h2o", 0.1, {"window": 0.3}).window_size(400) == 120


def test_query_rows_of_each_method():
    is_image = torch.tensor([False, True, True, True, False, False, False, False, False, False])
    assert build_method("h2o", 0.5).query_mask(is_image).all()
    assert build_method("streamingllm", 0.5).query_mask(is_image) is None
    # SnapKV: the last window of the capacity 5: max(1, floor(0.1 * 5)) = 1 query; a larger window, more
    assert build_method("snapkv", 0.5).query_mask(is_image).nonzero().squeeze(-1).tolist() == [9]
    window = build_method("snapkv", 0.5, {"window": 0.4}).query_mask(is_image)
    assert window.nonzero().squeeze(-1).tolist() == [8, 9]
    # VL-Cache: the tokens after the last image token; every token when nothing follows the image
    assert build_method("vlcache", 0.5).query_mask(is_image).nonzero().squeeze(-1).tolist() == list(
        range(4, 10)
    )
    assert build_method("vlcache", 0.5).query_mask(torch.ones(4, dtype=torch.bool)).all()


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("h2o", {"window": 1.5}, "window 1.5 is larger than the budget"),
        ("snapkv", {"pooling": "median"}, "unknown pooling kind 'median'"),
        ("snapkv", {"kernel": 4}, "kernel must be an odd integer"),
        ("snapkv", {"beta": 20.0}, "unknown parameter 'beta'"),
        ("pyramidkv", {"beta": 0.5}, "beta must be a number >= 1"),
        ("lookm", {"merge": "max"}, "unknown merge 'max'"),
        ("streamingllm", {"head_adaptive": True}, "unknown parameter 'head_adaptive'"),
    ],
)
def test_bad_parameters_fail_naming_them(method, params, message):
    with pytest.raises(ValueError, match=message):
        build_method(method, 0.1, params)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.1])
def test_budget_outside_the_range_fails(budget):
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        build_method("snapkv", budget)
