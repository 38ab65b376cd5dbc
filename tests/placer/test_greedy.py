"""Greedy policies: DeepSeek EPLB's golden case, hand-checked small cases, and the scenario-aware
greedy's invariants on random sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.placer.greedy import (
    balanced_packing,
    pack_for_scenarios,
    rebalance_experts,
    replicate_experts,
    replicate_for_scenarios,
)

# DeepSeek EPLB README: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
EPLB_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
EPLB_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def assert_consistent(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray) -> None:
    """log2phy lists exactly the slots of each expert (-1 after), logcnt counts them."""
    L, E, R = log2phy.shape
    assert R == logcnt.max()
    for l in range(L):
        np.testing.assert_array_equal(logcnt[l], np.bincount(phy2log[l], minlength=E))
        for e in range(E):
            slots = log2phy[l, e, : logcnt[l, e]]
            assert sorted(slots.tolist()) == np.flatnonzero(phy2log[l] == e).tolist()
            assert (log2phy[l, e, logcnt[l, e]:] == -1).all()


def test_deepseek_eplb_golden_case():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(EPLB_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == EPLB_PHY2LOG
    assert log2phy.shape == (2, 12, 2)
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert_consistent(phy2log, log2phy, logcnt)


def test_hierarchical_keeps_each_group_on_one_node():
    phy2log, _, _ = rebalance_experts(np.array(EPLB_WEIGHT), 16, 4, 2, 8)
    node_P = np.arange(16) // 8  # 8 slots per node
    for row in phy2log:
        group_nodes = {}
        for p, e in enumerate(row):
            group_nodes.setdefault(e // 3, set()).add(int(node_P[p]))
        assert all(len(nodes) == 1 for nodes in group_nodes.values())


def test_global_policy_when_groups_do_not_divide_nodes():
    weight = np.array(EPLB_WEIGHT)
    # 3 groups over 2 nodes: EPLB falls back to the global policy (one group on one node).
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 3, 2, 8)
    same, _, _ = rebalance_experts(weight, 16, 1, 1, 8)
    np.testing.assert_array_equal(phy2log, same)
    assert_consistent(phy2log, log2phy, logcnt)
    # The global policy replicates the 4 hottest experts of each layer, whatever their group.
    for l in range(2):
        hottest = set(np.argsort(-weight[l], kind="stable")[:4].tolist())
        assert set(np.flatnonzero(logcnt[l] == 2).tolist()) == hottest
    assert phy2log.tolist() != EPLB_PHY2LOG


def test_balanced_packing_by_hand():
    # Items by weight: 5 (i0) -> pack 0; 4 (i1) -> pack 1; 3 (i2) -> lighter pack 1 (4 < 5), now 7;
    # 2 (i3) -> pack 0 (5 < 7), now 7; 1 (i4) -> tie 7/7 -> first, pack 0 (full: 3 items);
    # 1 (i5) -> pack 1. Packs {i0, i3, i4} = 8 and {i1, i2, i5} = 8.
    pack, rank = balanced_packing(np.array([[5.0, 4, 3, 2, 1, 1]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_balanced_packing_one_item_per_pack_is_identity():
    pack, rank = balanced_packing(np.array([[3.0, 9, 1], [1.0, 2, 3]]), 3)
    assert pack.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert rank.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_replicate_experts_by_hand():
    # One copy each of experts 0, 1, 2 (load per copy 6, 4, 1). Copy 4 goes to expert 0 (6 is the
    # highest), now 3 per copy; copy 5 to expert 1 (4 > 3 > 1).
    phy2log, rank, logcnt = replicate_experts(np.array([[6.0, 4, 1]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1]]


def test_replicate_for_scenarios_follows_the_worst_workload():
    # Worst workload per expert: 0.5, 0.45, 0.45. The mean (0.3, 0.375, 0.325) would favour expert 1;
    # the worst-case policy gives the first spare slot to expert 0 (0.5), then 0.25 per replica is
    # below 0.45, so the next goes to expert 1 (first of the 0.45 tie), the third to expert 2.
    load_WE = np.array([[0.5, 0.3, 0.2], [0.1, 0.45, 0.45]])
    assert replicate_for_scenarios(load_WE, 4, max_replicas=4).tolist() == [2, 1, 1]
    assert replicate_for_scenarios(load_WE, 5, max_replicas=4).tolist() == [2, 2, 1]
    assert replicate_for_scenarios(load_WE, 6, max_replicas=4).tolist() == [2, 2, 2]
    # 3 + 6 spare: per replica 0.5/k, 0.45/k: expert 0 reaches the cap of 3 replicas.
    assert replicate_for_scenarios(load_WE, 9, max_replicas=3).tolist() == [3, 3, 3]


def test_replicate_for_scenarios_respects_the_cap():
    load_WE = np.array([[0.97, 0.01, 0.01, 0.01]])
    assert replicate_for_scenarios(load_WE, 8, max_replicas=2).tolist() == [2, 2, 2, 2]
    assert replicate_for_scenarios(load_WE, 8, max_replicas=5).tolist() == [5, 1, 1, 1]


def test_pack_for_scenarios_by_hand():
    # Replicas, heaviest per replica first: e0 (0.4), e1 (0.3), e2 (0.2), e3 (0.1) over 2 GPUs x 2:
    # e0 -> GPU 0, e1 -> GPU 1, e2 -> GPU 1 (0.3 + 0.2 < 0.4 + 0.2), e3 -> GPU 0 (the only room).
    out = pack_for_scenarios(np.array([[0.4, 0.3, 0.2, 0.1]]), np.ones(4, dtype=np.int64), 2, 2)
    assert out.tolist() == [[0, 3], [1, 2]]


def test_pack_for_scenarios_extra_cost_moves_a_replica():
    load = np.array([[0.4, 0.3, 0.2, 0.1]])
    extra = np.zeros((2, 4))
    extra[1, 2] = 1.0  # putting expert 2 on GPU 1 costs more than any imbalance
    out = pack_for_scenarios(load, np.ones(4, dtype=np.int64), 2, 2, extra)
    assert out.tolist() == [[0, 2], [1, 3]]


def test_pack_for_scenarios_makes_room_when_free_slots_hold_the_expert():
    # Per replica: e3 3, e0 e1 e2 1 each, e4 0.5 (two replicas). e3 -> GPU 0; e0, e1, e2 -> GPU 1
    # (1, 2, 3 stay below 4) which is now full; e4 -> GPU 0. The second e4 has no GPU: GPU 0 holds
    # it, GPU 1 is full. The greedy moves e0 (GPU 1's first expert not on GPU 0) to GPU 0 and puts
    # e4 in its place: loads 4.5 / 2.5, and 4.5 is optimal (e3 shares a GPU with e4 and one more).
    out = pack_for_scenarios(np.array([[1.0, 1, 1, 3, 1]]), np.array([1, 1, 1, 1, 2]), 2, 3)
    assert out.tolist() == [[3, 4, 0], [2, 1, 4]]


@st.composite
def packing_problems(draw):
    E = draw(st.integers(2, 24))
    G = draw(st.integers(1, 6))
    S = draw(st.integers(-(-E // G), E))
    W = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["dirichlet", "lognormal", "sparse"]))
    rng = np.random.default_rng(seed)
    if kind == "dirichlet":
        load = rng.dirichlet(np.full(E, rng.uniform(0.1, 3.0)), size=W)
    elif kind == "lognormal":
        load = rng.lognormal(0.0, 2.0, size=(W, E))
    else:  # many idle experts: ties everywhere
        load = rng.lognormal(0.0, 1.0, size=(W, E)) * (rng.random((W, E)) < 0.4)
    return load, G, S


@settings(max_examples=300, deadline=None, derandomize=True)
@given(packing_problems())
def test_pack_for_scenarios_fills_every_slot_without_duplicates(problem):
    load_WE, G, S = problem
    E = load_WE.shape[1]
    replicas_E = replicate_for_scenarios(load_WE, G * S, max_replicas=G)
    assert replicas_E.sum() == G * S and replicas_E.min() >= 1 and replicas_E.max() <= G
    out = pack_for_scenarios(load_WE, replicas_E, G, S)
    assert out.shape == (G, S)
    assert (out >= 0).all() and (out < E).all()
    assert all(len(set(row)) == S for row in out.tolist()), out
    np.testing.assert_array_equal(np.bincount(out.ravel(), minlength=E), replicas_E)


@pytest.mark.parametrize("seed", range(3))
def test_pack_for_scenarios_beats_a_round_robin_on_its_own_objective(seed):
    rng = np.random.default_rng(seed)
    E, G, S = 32, 8, 5
    load = rng.lognormal(0, 1, size=(3, E))
    replicas = replicate_for_scenarios(load, G * S, G)
    out = pack_for_scenarios(load, replicas, G, S)
    per_replica = load / replicas

    def worst(rows):
        return per_replica[:, rows].sum(axis=2).max()

    robin = np.repeat(np.arange(E), replicas).reshape(S, G).T  # slot-major: distinct per GPU as replicas <= G
    assert worst(out) <= worst(robin)


def test_pack_for_scenarios_on_many_uniform_random_sizes():
    """Hypothesis leans to small and boundary sizes; about 1% of uniformly drawn problems used to
    leave a replica with no GPU, so sweep a few thousand fixed-seed ones too."""
    rng = np.random.default_rng(2024)
    for _ in range(3000):
        E, G = int(rng.integers(2, 25)), int(rng.integers(1, 7))
        S, W = int(rng.integers(-(-E // G), E + 1)), int(rng.integers(1, 5))
        load = rng.lognormal(0.0, 2.0, size=(W, E)) * (rng.random((W, E)) < rng.uniform(0.3, 1.0))
        replicas = replicate_for_scenarios(load, G * S, max_replicas=G)
        out = pack_for_scenarios(load, replicas, G, S)
        assert all(len(set(row)) == S for row in out.tolist())
        np.testing.assert_array_equal(np.bincount(out.ravel(), minlength=E), replicas)
