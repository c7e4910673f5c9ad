"""Vectorised row reductions against torch's direct forms, bit for bit."""

from __future__ import annotations

import pytest
import torch

from effivlm.ops import count_below, gather_rows, row_argmax


@pytest.mark.parametrize("threshold", [1e-9, 0.01, 0.5, 0.999])
def test_count_below_equals_the_comparison_exactly(threshold):
    """Entries equal to the limit (not below), just below it, zeros, denormals, peaked and flat rows, with and
    without a scratch tensor (a bfloat16 one is not used)."""
    generator = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(3, 64, 300, generator=generator) * 6, dim=-1)
    probs[0, 0] = 1.0 / 300  # a flat row
    probs[0, 1, :150] = 0.0  # masked entries
    probs[0, 2, 5] = 1e-44  # a denormal
    limit = probs.amax(dim=-1, keepdim=True) * threshold
    probs[1, :, 7] = limit[1, :, 0]  # exactly at the limit: not below
    probs[1, :, 9] = torch.nextafter(limit[1, :, 0], torch.zeros(()))  # just below
    want = probs.lt(probs.amax(dim=-1, keepdim=True) * threshold).sum(dim=-1)
    assert int(want[1].min()) >= 1  # the just-below entry counts in every row of sample 1
    for scratch in (None, torch.empty_like(probs), torch.empty(probs.shape, dtype=torch.bfloat16)):
        got = count_below(probs, threshold, scratch)
        assert got.dtype == torch.float32
        assert torch.equal(got.long(), want)


def test_count_below_writes_into_a_float32_scratch():
    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    scratch = torch.full_like(probs, 5.0)
    count_below(probs, 0.1, scratch)
    assert set(scratch.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("bad", [0.0, 1e-12, 1.0, 2.0])
def test_count_below_rejects_a_threshold_out_of_range(bad):
    with pytest.raises(ValueError, match="threshold must be in"):
        count_below(torch.full((2, 3), 1 / 3), bad)


@pytest.mark.parametrize("n", [1, 5, 64, 127, 128, 129, 300, 1640])
def test_row_argmax_equals_argmax(n):
    """Every width around the block size, a maximum in the short last block, and ties across and inside
    blocks (the first index wins)."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3, 40, n, generator=generator)
    x[0, 0, -1] = 10.0  # the maximum in the last column
    x[0, 1, :] = 1.0  # every entry tied
    if n > 70:
        x[0, 2, 3] = x[0, 2, 70] = 9.0  # tied across blocks
        x[0, 3, 65] = x[0, 3, 66] = 9.0  # tied inside a block
    x[1] = torch.randint(0, 3, (40, n), generator=generator).float()  # many ties
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x, block=8), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[0, 0]), x[0, 0].argmax())


def test_gather_rows_equals_gather_on_a_strided_view():
    """A view that starts inside each head's rows (a left-padded sample's cache), and an expanded index."""
    generator = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 4, 30, 8, generator=generator)
    keys = cache[1, :, 5:]  # (4, 25, 8), not contiguous
    index = torch.stack([torch.randperm(25, generator=generator)[:9].sort().values for _ in range(4)])
    want = keys.gather(1, index[..., None].expand(-1, -1, 8))
    assert torch.equal(gather_rows(keys, index), want)
    shared = torch.arange(3, 12).expand(4, -1)
    assert torch.equal(gather_rows(keys, shared), keys[:, 3:12])
