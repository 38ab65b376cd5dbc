"""Remote nodes per token: hand-worked expectations under each rule, and the tokens drawn by
group-limited routing when a trace has no per-token samples."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch, dispatch_model
from moeplace.placer.traffic import remote_nodes_L, token_sample
from moeplace.topology import Topology
from moeplace.trace import Trace

TOPO = Topology(4, 2, 2)  # 2 nodes of 2 GPUs, 8 slots


def layout(row) -> Placement:
    return Placement(np.array([row]), 7, TOPO, np.array([0]), num_model_layers=1)


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_single_replicas_by_hand(dispatch):
    p = layout([0, 1, 2, 3, 4, 5, 6, 0])  # experts 1..3 on node 0, 4..6 on node 1, 0 on both
    model = dispatch_model(p, dispatch)
    ids = np.array([[[1, 2]], [[1, 4]], [[4, 5]], [[1, -1]]])  # [T=4, L=1, K=2]
    # token 0 stays on node 0: remote only from node 1 (half the sources); token 1 spans both nodes:
    # one remote from either; token 2 mirrors token 0; token 3 uses one expert on node 0.
    expected = (0.5 + 1.0 + 0.5 + 0.5) / 4
    assert remote_nodes_L(p, ids, model.shares_LP, model.choice_GLE)[0] == pytest.approx(expected)


def test_replicated_expert_under_equal_and_static():
    p = layout([0, 1, 2, 3, 0, 4, 5, 6])  # expert 0 on GPU 0 (node 0) and GPU 2 (node 1)
    ids = np.array([[[0, -1]]])
    equal = dispatch_model(p, Dispatch.equal)
    # equal: a random replica, node 0 or 1 with one half each; remote for half the sources: 0.5
    assert remote_nodes_L(p, ids, equal.shares_LP)[0] == pytest.approx(0.5)
    static = dispatch_model(p, Dispatch.sglang_static)
    # static: every rank sends to the replica on its own node: never remote
    assert remote_nodes_L(p, ids, static.shares_LP, static.choice_GLE)[0] == 0.0


def test_drawn_tokens_follow_group_limited_routing():
    rng = np.random.default_rng(0)
    E, groups = 32, 8
    counts = rng.lognormal(0, 1, (2, 3, E)) * 100
    trace = Trace(counts, np.arange(3), 4, n_group=groups, topk_group=2)
    sample = token_sample(trace, np.arange(3), tokens=500)
    assert sample.source == "group-limited model" and sample.topk_ids_TLK.shape == (500, 3, 4)
    ids = sample.topk_ids_TLK
    assert (ids >= 0).all()
    for t in range(0, 500, 7):
        for l in range(3):
            assert len(set(ids[t, l].tolist())) == 4  # distinct experts
            assert len(set((ids[t, l] // (E // groups)).tolist())) <= 2  # from at most topk_group groups
    # popular experts are drawn more often
    load = counts.sum(0)[0]
    drawn = np.bincount(ids[:, 0].ravel(), minlength=E)
    assert np.corrcoef(load, drawn)[0, 1] > 0.5


def test_samples_are_used_when_present():
    ids = np.array([[[0, 1]], [[2, 3]]])
    trace = Trace(np.ones((1, 1, 4)), np.array([0]), 2, topk_ids_TLK=ids)
    sample = token_sample(trace, np.array([0]))
    assert sample.source == "samples"
    np.testing.assert_array_equal(sample.topk_ids_TLK, ids)
