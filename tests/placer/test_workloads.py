"""placer/workloads.py: workloads from traces (normalised, merged, named), groups and token samples."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.placer.workloads import routing_groups, token_samples, workload_shares
from moeplace.trace import Trace


def trace(counts_WLE, name: str, layers=(3, 4), **kw) -> Trace:
    return Trace(np.asarray(counts_WLE, dtype=float), np.array(layers), top_k=1, source=f"/data/{name}", **kw)


def test_each_window_is_a_workload_normalised_to_one():
    a = trace([[[1, 3], [2, 2]]], "a.safetensors")
    b = trace([[[10, 30], [5, 15]], [[0, 0], [1, 1]], [[100, 0], [0, 100]]], "b.safetensors")
    share_WLE, names = workload_shares([a, b])
    # b's window 1 has a layer with no tokens: it says nothing about the load, dropped
    assert names == ["a.safetensors", "b.safetensors[0]", "b.safetensors[2]"]
    np.testing.assert_allclose(share_WLE, [[[0.25, 0.75], [0.5, 0.5]],
                                           [[0.25, 0.75], [0.25, 0.75]],
                                           [[1, 0], [0, 1]]])


def test_many_short_windows_merge_into_consecutive_groups():
    counts = np.arange(1, 11, dtype=float)[:, None, None] * np.ones((10, 2, 2))
    share_WLE, names = workload_shares([trace(counts, "long.safetensors")], max_workloads=4)
    assert names == [f"long.safetensors{r}" for r in ("[0:2]", "[2:5]", "[5:8]", "[8:10]")]
    np.testing.assert_allclose(share_WLE, 0.5)


def test_incompatible_or_idle_traces_are_named():
    a = trace([[[1, 3], [2, 2]]], "a.safetensors")
    with pytest.raises(ValueError, match="/data/c: has 3 experts, but /data/a.safetensors has 2"):
        workload_shares([a, trace([[[1, 1, 1], [1, 1, 1]]], "c")])
    with pytest.raises(ValueError, match=r"/data/d: MoE layers 3..5 \(2 layers\) differ from /data/a.safetensors's 3..4"):
        workload_shares([a, trace([[[1, 1], [1, 1]]], "d", layers=(3, 5))])
    with pytest.raises(ValueError, match="/data/idle: every window has a layer with no routed tokens"):
        workload_shares([trace([[[1, 1], [0, 0]]], "idle")])


def test_routing_groups():
    assert routing_groups(trace(np.ones((1, 2, 8)), "g", n_group=4, topk_group=2)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert routing_groups(trace(np.ones((1, 2, 8)), "g")) is None


def test_token_samples_concatenate_when_every_sampled_trace_agrees_on_k():
    ids = np.zeros((5, 2, 1), dtype=np.int64)
    with_ids = trace(np.ones((1, 2, 4)), "s", topk_ids_TLK=ids)
    assert token_samples([with_ids, trace(np.ones((1, 2, 4)), "n"), with_ids]).shape == (10, 2, 1)
    assert token_samples([trace(np.ones((1, 2, 4)), "n")]) is None
