"""The method registry and the methods of the foundation: dense and random."""

from __future__ import annotations

import pytest
import torch

from effivlm.methods import SegmentContext, available_methods, build_method, kept_count, method_params


def test_registry_lists_the_methods():
    assert {"dense", "random"} <= set(available_methods())
    assert method_params("random") == {"seed": int}


def test_unknown_method_names_the_closest_and_the_known():
    with pytest.raises(
        ValueError, match=r"unknown method 'randm' \(did you mean 'random'\?\); known: .*dense"
    ):
        build_method("randm", 0.1)


def test_unknown_parameter_is_named():
    with pytest.raises(
        ValueError, match=r"method 'random': unknown parameter 'sed' \(did you mean 'seed'\?\)"
    ):
        build_method("random", 0.1, {"sed": 1})


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, "0.1", True])
def test_budget_outside_the_range_fails(budget):
    with pytest.raises(ValueError, match="budget"):
        build_method("random", budget)


def test_dense_only_at_full_budget():
    with pytest.raises(ValueError, match="dense"):
        build_method("dense", 0.5)


@pytest.mark.parametrize(
    ("budget", "n", "k"), [(0.01, 16, 1), (0.1, 16, 2), (0.4, 16, 7), (1.0, 16, 16), (0.3, 10, 3)]
)
def test_kept_count_is_the_ceiling_of_the_share(budget, n, k):
    assert kept_count(budget, n) == k


def test_random_selection_is_sorted_unique_and_seeded():
    feats = torch.randn(100, 8)
    ctx = SegmentContext(features=feats, grid=(10, 10), sample_index=3, image_index=0, segment_index=0)
    red = build_method("random", 0.1, {"seed": 1}).reduce(ctx)
    assert red.positions.tolist() == sorted(set(red.positions.tolist()))
    assert red.positions.numel() == 10
    torch.testing.assert_close(red.features, feats[red.positions])
    again = build_method("random", 0.1, {"seed": 1}).reduce(ctx)
    other_seed = build_method("random", 0.1, {"seed": 2}).reduce(ctx)
    assert torch.equal(red.positions, again.positions)
    assert not torch.equal(red.positions, other_seed.positions)
    # the draw does not depend on the sample's place in the batch
    moved = SegmentContext(features=feats, grid=(10, 10), sample_index=0, image_index=0, segment_index=0)
    assert torch.equal(build_method("random", 0.1, {"seed": 1}).reduce(moved).positions, red.positions)
