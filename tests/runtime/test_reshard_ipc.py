"""The copy-engine pull (`PeerCopies`): which copies a pull makes (on CPU), and that every way of posting
them, batched or one driver call per copy, on one stream or two, or torch's copy_, lands the same bytes
as the peer's slots (on two GPUs of one process: the peer's memory has an address here, as an IPC
mapping's does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplace.runtime.reshard_ipc import PeerCopies, Spent, _CopyPlan, slot_runs
from moeplace.runtime.slots import SlotWeights

PATTERNS = {"consecutive": [3, 4, 5, 6], "every_other": [0, 2, 4, 6, 8], "reversed": [9, 8, 7, 1],
            "one": [5], "mixed": [2, 3, 7, 8, 9, 0, 11]}


@pytest.mark.parametrize("src_N", PATTERNS.values(), ids=PATTERNS.keys())
def test_slot_runs_cover_the_slots_in_order(src_N):
    starts, firsts, lengths = slot_runs(np.array(src_N))
    rebuilt = np.concatenate([np.arange(f, f + n) for f, n in zip(firsts, lengths)])
    assert rebuilt.tolist() == src_N
    assert np.array_equal(starts, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    assert all(src_N[s + n - 1] + 1 != src_N[s + n] for s, n in zip(starts, lengths) if s + n < len(src_N))


def test_copy_plan_rows_and_streams():
    """Runs become byte ranges of whole rows, spread round-robin over the streams, across tensors too."""
    dst, src = torch.zeros(4, 3, dtype=torch.int64), torch.zeros(12, 3, dtype=torch.int64)
    plan = _CopyPlan(2)
    starts, firsts, lengths = slot_runs(np.array([2, 3, 7, 9]))
    plan.runs(dst, src, starts, firsts, lengths)
    plan.runs(dst, src, starts, firsts, lengths)
    plan.add(0, 1, 2, 3)
    (d0, s0, z0), (d1, s1, z1) = plan.arrays()
    row = 24
    assert (d0[:3] - dst.data_ptr()).tolist() == [0, 3 * row, 2 * row] and z0.tolist() == [2 * row, row, row, 3]
    assert (s0[:3] - src.data_ptr()).tolist() == [2 * row, 9 * row, 7 * row] and (d0[3], s0[3]) == (1, 2)
    assert (d1 - dst.data_ptr()).tolist() == [2 * row, 0, 3 * row] and z1.tolist() == [row, 2 * row, row]
    assert s1.dtype == np.uint64


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="peer copies need two CUDA GPUs")
@pytest.mark.parametrize("streams,batch,driver", [(1, True, True), (2, True, True), (1, False, True),
                                                  (2, False, True), (1, True, False)])
def test_every_way_of_pulling_lands_the_peer_bytes(streams, batch, driver):
    here, there = torch.device("cuda", 0), torch.device("cuda", 1)
    shapes = [(512, 256), (4, 2), (256, 256), (2, 2)]  # w13, its scales, w2, its scales (as slots.py, tiny)
    gen = torch.Generator().manual_seed(streams * 10 + batch)
    peer = SlotWeights(*(torch.randint(-2**31, 2**31 - 1, (12, *s), generator=gen, dtype=torch.int32)
                         .view(torch.float32 if i % 2 else torch.int32).to(there) for i, s in enumerate(shapes)))
    peer = SlotWeights(peer.w13.view(torch.uint8).view(torch.float8_e4m3fn), peer.w13_sinv,
                       peer.w2.view(torch.uint8).view(torch.float8_e4m3fn), peer.w2_sinv)
    copies = PeerCopies(here, {1: [peer]}, streams, batch, priority=-1)
    assert all(s.priority < 0 for s in copies.copy_streams)  # torch maps -1 into the device's range
    if not driver:
        copies.driver = None  # torch's copy_, the path where the driver library cannot be loaded
    if driver:
        assert copies.batch == (batch and copies.driver.batch_fn is not None)
        # peer access on: else the driver stages the copies through host memory (same bytes, ~10x slower)
        assert copies.direct == {1: bool(torch.cuda.can_device_access_peer(0, 1))}
        # ... both ways: the peer's memory is mapped in the peer device's context, and a copy from it with
        # access enabled only from here went through host memory (31 GB/s against ~360 on 2xH200)
        if copies.direct[1]:
            assert copies.driver.enabled(here, there) and copies.driver.enabled(there, here)
    for name, src_N in PATTERNS.items():
        dst = SlotWeights.empty_like(SlotWeights(*(t.to(here) for t in peer.row(0).tensors())), len(src_N))
        for t in dst.tensors():
            t.view(torch.uint8).fill_(0xAB)
        copies.pull(1, 0, np.array(src_N), dst).synchronize()
        for got, want in zip(dst.tensors(), peer.tensors()):
            assert torch.equal(got.view(torch.uint8).cpu(), want[src_N].view(torch.uint8).cpu()), name
    if driver:  # the pulls' sections and their copies' time on the GPU, as the server logs them
        assert copies.spent.calls == len(PATTERNS) and " GB/s)" in copies.spent.line()


def test_spent_sums_sections_wall_and_cpu():
    """A sleep is wall time without CPU time (what a wait looks like in the server log's pulls line)."""
    import time

    spent = Spent()
    for _ in range(2):
        spent.start()
        time.sleep(0.02)
        spent.lap("wait")
        sum(i * i for i in range(200_000))
        spent.lap("work")
    assert spent.calls == 2 and spent.wall_s["wait"] >= 0.04 and spent.cpu_s["wait"] < 0.02
    assert spent.cpu_s["work"] > 0 and spent.line().startswith("2 pulls; wait ")
