"""CPU task execution and reusable work buffers."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from effivlm import parallel
from effivlm.parallel import KEEP_BYTES, Scratch, run_tasks

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_name_reuses_its_buffer_and_names_do_not_share():
    scratch = Scratch()
    a = scratch.take("a", (4, 8), torch.float32, CPU)
    b = scratch.take("b", (4, 8), torch.float32, CPU)
    assert a.data_ptr() != b.data_ptr()
    smaller = scratch.take("a", (2, 3), torch.float32, CPU)
    assert smaller.shape == (2, 3) and smaller.is_contiguous()
    assert smaller.data_ptr() == a.data_ptr()  # a smaller request is a view of the same memory
    grown = scratch.take("a", (10, 10), torch.float32, CPU)
    assert grown.shape == (10, 10)
    assert scratch.take("a", (5, 5), torch.float32, CPU).data_ptr() == grown.data_ptr()
    other_dtype = scratch.take("a", (4, 8), torch.float64, CPU)
    assert other_dtype.dtype == torch.float64 and other_dtype.data_ptr() != grown.data_ptr()
    assert scratch.held_bytes() == 100 * 4 + 32 * 4 + 32 * 8
    with torch.inference_mode():
        scratch.take("c", (3,), torch.float32, CPU).fill_(1.0)
    scratch.take("c", (3,), torch.float32, CPU).fill_(2.0)  # made in inference mode, writable outside it


def test_large_buffers_and_non_keeping_scratches_are_not_held():
    scratch = Scratch()
    big = KEEP_BYTES // 4 + 1
    scratch.take("big", (big,), torch.float32, CPU)
    assert scratch.held_bytes() == 0
    plain = Scratch(keep=False)
    plain.take("x", (3,), torch.float32, CPU)
    assert plain.held_bytes() == 0


@pytest.mark.usefixtures("two_threads")
def test_tasks_run_on_workers_with_the_callers_modes_and_reuse_scratches(monkeypatch):
    monkeypatch.setattr(parallel, "_SPARE", queue.SimpleQueue())  # none left by earlier tests
    seen = []
    lock = threading.Lock()

    def task(scratch):
        out = scratch.take("out", (2,), torch.float32, CPU)
        torch.ones(2, out=out)
        with lock:
            seen.append(
                (
                    threading.get_ident(),
                    id(scratch),
                    torch.is_inference_mode_enabled(),
                    torch.get_num_threads(),
                )
            )

    with torch.inference_mode():
        run_tasks([task] * 6, CPU)
    assert len(seen) == 6
    assert all(inference and threads == 1 for _, _, inference, threads in seen)
    assert threading.get_ident() not in {ident for ident, *_ in seen}  # on the pool's threads
    assert torch.get_num_threads() == 2
    scratches = {sid for _, sid, *_ in seen}
    assert len(scratches) <= 2  # one per task running at once
    seen.clear()
    run_tasks([task] * 4, CPU)
    assert {sid for _, sid, *_ in seen} <= scratches  # the next call reuses them
    assert not any(inference for _, _, inference, _ in seen)


@pytest.mark.usefixtures("two_threads")
def test_a_failing_task_restores_the_thread_count_and_returns_its_scratch():
    def fail(scratch):
        raise RuntimeError("task failed")

    spare = parallel._SPARE.qsize()
    with pytest.raises(RuntimeError, match="task failed"):
        run_tasks([fail, fail], CPU)
    assert torch.get_num_threads() == 2
    assert parallel._SPARE.qsize() >= max(spare, 1)


def test_one_thread_runs_in_order_in_the_callers_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = []
        run_tasks([lambda s, i=i: order.append((i, threading.get_ident())) for i in range(3)], CPU)
    finally:
        torch.set_num_threads(before)
    assert [i for i, _ in order] == [0, 1, 2]
    assert {ident for _, ident in order} == {threading.get_ident()}
