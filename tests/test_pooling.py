"""Spatial average pooling: the pure functions against slow loops, and the method on every family."""

from __future__ import annotations

import math

import pytest
import torch

from effivlm.backbones.loading import load_backbone
from effivlm.methods import SegmentContext, build_method, kept_count
from effivlm.methods.tokens.pooling import output_grid, pool_grid, pool_sequence, pool_tokens
from effivlm.pipeline import Pipeline, Prompt

FAMILIES = ["internvl", "llava_onevision", "qwen2_5_vl", "qwen2_vl"]
QUESTIONS = ["what color is the shape at the top left?", "how many shapes are there?"]


# ------------------------------------------------------------------ slow, obviously-correct references
def _window(i: int, n_in: int, n_out: int) -> tuple[int, int]:
    return math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)


def slow_pool_sequence(features, k):
    n = features.shape[0]
    positions, pooled = [], []
    for i in range(k):
        start, end = _window(i, n, k)
        positions.append((start + end - 1) // 2)
        pooled.append(features[start:end].mean(0))
    return torch.tensor(positions), torch.stack(pooled)


def slow_pool_grid(features, grid, out_grid):
    rows, cols = grid
    positions, pooled = [], []
    for i in range(out_grid[0]):
        r0, r1 = _window(i, rows, out_grid[0])
        for j in range(out_grid[1]):
            c0, c1 = _window(j, cols, out_grid[1])
            members = [features[r * cols + c] for r in range(r0, r1) for c in range(c0, c1)]
            pooled.append(torch.stack(members).mean(0))
            positions.append(((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2)
    return torch.tensor(positions), torch.stack(pooled)


def slow_output_grid(grid, k):
    rows, cols = grid
    fits = [(r, k // r) for r in range(1, k + 1) if k % r == 0 and r <= rows and k // r <= cols]
    if not fits:
        return None
    # rounded so that mirror-image ratios (1 x 2 and 2 x 1 of a square grid) tie despite float error
    return min(fits, key=lambda rc: (round(abs(math.log(rc[0] / rc[1]) - math.log(rows / cols)), 9), rc[0]))


def _assert_sorted_unique(positions, n):
    assert positions.dtype == torch.long
    assert positions.tolist() == sorted(set(positions.tolist()))
    assert int(positions.min()) >= 0 and int(positions.max()) < n


# ------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("n", [1, 5, 16, 17, 100])
def test_pool_sequence_matches_the_loop(n):
    features = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    for k in sorted({min(n, k) for k in (1, 2, 3, (n + 1) // 2, max(1, n - 1), n)}):
        positions, pooled = pool_sequence(features, k)
        ref_positions, ref_pooled = slow_pool_sequence(features, k)
        assert torch.equal(positions, ref_positions)
        torch.testing.assert_close(pooled, ref_pooled)
        _assert_sorted_unique(positions, n)


@pytest.mark.parametrize("grid", [(1, 1), (4, 4), (3, 5), (7, 2), (10, 10), (9, 14)])
def test_pool_grid_matches_the_loop(grid):
    rows, cols = grid
    features = torch.randn(rows * cols, 6, generator=torch.Generator().manual_seed(rows * 31 + cols))
    for out_rows in sorted({1, 2, (rows + 1) // 2, max(1, rows - 1), rows}):
        for out_cols in sorted({1, 3, (cols + 1) // 2, cols}):
            if out_rows > rows or out_cols > cols:
                continue
            positions, pooled = pool_grid(features, grid, (out_rows, out_cols))
            ref_positions, ref_pooled = slow_pool_grid(features, grid, (out_rows, out_cols))
            assert torch.equal(positions, ref_positions)
            torch.testing.assert_close(pooled, ref_pooled)
            _assert_sorted_unique(positions, rows * cols)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 2), (10, 10), (9, 14), (1, 8)])
def test_output_grid_is_the_closest_fitting_factorisation(grid):
    for k in range(1, grid[0] * grid[1] + 1):
        out = output_grid(grid, k)
        assert out == slow_output_grid(grid, k), k
        if out is not None:
            assert out[0] * out[1] == k and out[0] <= grid[0] and out[1] <= grid[1]
    assert output_grid(grid, grid[0] * grid[1]) == grid


def test_output_grid_examples():
    assert output_grid((4, 4), 4) == (2, 2)
    assert output_grid((4, 4), 2) == (1, 2)  # a tie between 1 x 2 and 2 x 1 goes to fewer rows
    assert output_grid((4, 4), 6) == (2, 3)
    assert output_grid((4, 4), 7) is None  # prime and longer than a side: pooled as a sequence
    assert output_grid((3, 6), 8) == (2, 4)


@pytest.mark.parametrize(("grid", "n"), [((4, 4), 16), ((3, 5), 15), ((9, 14), 126), (None, 17), (None, 40)])
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.4, 1.0])
def test_method_keeps_exactly_the_budget(grid, n, budget):
    features = torch.randn(n, 8)
    ctx = SegmentContext(features=features, grid=grid, sample_index=0, image_index=0, segment_index=0)
    red = build_method("pool", budget).reduce(ctx)
    k = kept_count(budget, n)
    assert red.positions.shape == (k,)
    assert red.features.shape == (k, 8)
    _assert_sorted_unique(red.positions, n)
    ref_positions, ref_features = pool_tokens(features, grid, k)
    assert torch.equal(red.positions, ref_positions)
    assert torch.equal(red.features, ref_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("grid", "n"), [((4, 4), 16), ((3, 5), 15), (None, 17)])
def test_full_budget_is_the_identity(grid, n, dtype):
    features = torch.randn(n, 8).to(dtype)
    ctx = SegmentContext(features=features, grid=grid, sample_index=0, image_index=0, segment_index=0)
    red = build_method("pool", 1.0).reduce(ctx)
    assert torch.equal(red.positions, torch.arange(n))
    assert red.features.dtype == dtype
    assert torch.equal(red.features, features)


def test_grid_without_a_fitting_factorisation_pools_the_sequence():
    features = torch.randn(16, 4)
    positions, pooled = pool_tokens(features, (4, 4), 7)
    ref_positions, ref_pooled = slow_pool_sequence(features, 7)
    assert torch.equal(positions, ref_positions)
    torch.testing.assert_close(pooled, ref_pooled)


def test_bad_sizes_are_named():
    features = torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"grid \(3, 5\) holds 15 tokens, features hold 16"):
        pool_grid(features, (3, 5), (1, 1))
    with pytest.raises(ValueError, match=r"output grid \(5, 1\) does not fit inside grid \(4, 4\)"):
        pool_grid(features, (4, 4), (5, 1))
    with pytest.raises(ValueError, match=r"k must be in \[1, 16\], got 17"):
        pool_sequence(features, 17)


def test_registry_entry_and_unknown_parameter():
    from effivlm.methods import method_params

    assert method_params("pool") == {}
    with pytest.raises(ValueError, match=r"method 'pool': unknown parameter 'seed'; allowed: \(none\)"):
        build_method("pool", 0.1, {"seed": 1})


# ------------------------------------------------------------------ through the pipeline, every family
@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request, tiny_paths):
    return load_backbone(str(tiny_paths[request.param]), request.param)


def _prompts(images, n=2):
    return [Prompt([images[i]], QUESTIONS[i % 2]) for i in range(n)]


# on the tiny 4 x 4 grids: 0.01 -> 1 x 1, 0.1 -> 1 x 2, 0.25 -> 2 x 2, 0.4 -> 7 tokens pooled as a sequence
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.25, 0.4, 1.0])
def test_pool_keeps_the_budget_in_every_segment(backbone, images, budget):
    pipe = Pipeline(backbone, build_method("pool", budget))
    inputs = pipe.encode(_prompts(images))
    pre = pipe.prefill_inputs(inputs)
    for b, stats in enumerate(pre.stats):
        (n_tokens,) = stats["visual_tokens"]
        segments = backbone.adapter.image_segments(backbone.model, inputs, b, n_tokens)
        assert stats["visual_kept"] == [sum(kept_count(budget, s.length) for s in segments)]
        assert stats["prefill_tokens"] == stats["prompt_tokens"] - (n_tokens - stats["visual_kept"][0])


def test_pool_at_full_budget_reproduces_dense(backbone, images):
    prompts = _prompts(images, 4)
    dense_pipe = Pipeline(backbone, build_method("dense"))
    full_pipe = Pipeline(backbone, build_method("pool", 1.0))
    inputs = dense_pipe.encode(prompts)
    with torch.inference_mode():
        dense_pre, full_pre = dense_pipe.prefill_inputs(inputs), full_pipe.prefill_inputs(inputs)
    assert torch.equal(full_pre.inputs_embeds, dense_pre.inputs_embeds)
    assert torch.equal(full_pre.position_ids, dense_pre.position_ids)
    dense = dense_pipe.generate(prompts, max_new_tokens=5)
    full = full_pipe.generate(prompts, max_new_tokens=5)
    assert [g.text for g in full] == [g.text for g in dense]


def test_pool_batch_of_three_equals_three_batches_of_one(backbone, images):
    prompts = _prompts(images, 3)
    pipe = Pipeline(backbone, build_method("pool", 0.25))
    batched = [g.text for g in pipe.generate(prompts, max_new_tokens=5)]
    single = [pipe.generate([p], max_new_tokens=5)[0].text for p in prompts]
    assert batched == single
