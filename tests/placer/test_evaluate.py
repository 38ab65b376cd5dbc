"""placer/evaluate.py, the specification: each score against cases worked out by hand, and the best
split against an exact brute force on small layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.placer.evaluate import (align, best_split, distinct_nodes, evaluate, gpu_load_LG, group_span,
                                      imbalance, moves)
from moeplace.topology import Topology
from moeplace.trace import Trace


def placement(rows: list[list[int]], experts: int, gpus: int, gpus_per_node: int, expert_bytes: int = 100) -> Placement:
    slots = len(rows[0]) // gpus
    return Placement(np.array(rows), experts, Topology(gpus, gpus_per_node, slots, expert_bytes=expert_bytes),
                     np.arange(len(rows)), source="hand")


# Two GPUs of two slots; expert 0 has a replica on each: GPU 0 = {0, 1}, GPU 1 = {2, 0}.
SPLIT = placement([[0, 1, 2, 0]], experts=3, gpus=2, gpus_per_node=1)
LOAD = np.array([[6.0, 2.0, 4.0]])


def test_equal_split_load_and_imbalance_by_hand():
    # expert 0's 6 tokens go 3 + 3: GPU 0 = 3 + 2 = 5, GPU 1 = 4 + 3 = 7; mean 6
    np.testing.assert_allclose(gpu_load_LG(SPLIT, LOAD), [[5.0, 7.0]])
    np.testing.assert_allclose(imbalance(gpu_load_LG(SPLIT, LOAD)), [7 / 6])
    # a given split: expert 0's replicas take 1/6 and 5/6
    np.testing.assert_allclose(gpu_load_LG(SPLIT, LOAD, np.array([[1 / 6, 1, 1, 5 / 6]])), [[3.0, 9.0]])


def test_a_layer_without_load_counts_as_balanced():
    np.testing.assert_allclose(imbalance(np.array([[0.0, 0.0], [1.0, 3.0]])), [1.0, 1.5])


def test_best_split_by_hand():
    # GPU 0 = s + 2, GPU 1 = 4 + (6 - s): equal at s = 4, both 6: perfect balance
    imb_L, split_LP = best_split(SPLIT, LOAD)
    np.testing.assert_allclose(imb_L, [1.0], atol=1e-9)
    np.testing.assert_allclose(split_LP, [[4 / 6, 1, 1, 2 / 6]], atol=1e-9)
    np.testing.assert_allclose(gpu_load_LG(SPLIT, LOAD, split_LP), [[6.0, 6.0]], atol=1e-9)


def test_best_split_cannot_beat_an_unreplicated_hot_expert():
    p = placement([[0, 1, 2, 2]], experts=3, gpus=2, gpus_per_node=1)
    # expert 0 (load 9) has one replica: GPU 0 holds at least 9 + 1 of the 12; mean 6
    np.testing.assert_allclose(best_split(p, np.array([[9.0, 1.0, 2.0]]))[0], [10 / 6], atol=1e-9)


def brute_force_best_imbalance(phy2log: np.ndarray, load_E: np.ndarray, gpus: int) -> float:
    """Exact optimum of the fractional split, by Hall's condition: the hottest GPU must carry at least
    the load of the experts confined to any set U of GPUs, spread over U: max over U of load(U) / |U|."""
    slots = len(phy2log) // gpus
    gpus_of = [set(np.nonzero(phy2log == e)[0] // slots) for e in range(len(load_E))]
    hottest = max(sum(load_E[e] for e in range(len(load_E)) if gpus_of[e] <= set(U)) / len(U)
                  for size in range(1, gpus + 1) for U in itertools.combinations(range(gpus), size))
    return hottest / (load_E.sum() / gpus)


@pytest.mark.parametrize("seed", range(12))
def test_best_split_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    E, G = int(rng.integers(3, 7)), int(rng.integers(2, 5))
    S = -(-E // G) + int(rng.integers(0, 2))  # every expert fits, sometimes with spare slots to replicate
    rows = rng.permutation(np.concatenate([rng.permutation(E), rng.integers(0, E, G * S - E)]))
    p = placement([rows.tolist()], experts=E, gpus=G, gpus_per_node=1)
    load_E = rng.lognormal(0, 1, E) * 100
    imb_L, split_LP = best_split(p, load_E[None])
    assert imb_L[0] == pytest.approx(brute_force_best_imbalance(rows, load_E, G), rel=1e-6)
    # the split it returns reaches that imbalance, each expert's shares sum to 1, and it is never
    # worse than the equal split
    assert imbalance(gpu_load_LG(p, load_E[None], split_LP))[0] == pytest.approx(imb_L[0], rel=1e-6)
    np.testing.assert_allclose(np.bincount(rows, weights=split_LP[0], minlength=E), 1.0)
    assert imb_L[0] <= imbalance(gpu_load_LG(p, load_E[None]))[0] + 1e-9


# Four GPUs, two per node, one slot each: experts 0, 1 on node 0, experts 2, 3 on node 1.
NODES = placement([[0, 1, 2, 3]], experts=4, gpus=4, gpus_per_node=2)


def test_distinct_nodes_by_hand():
    ids_TLK = np.array([[[0, 1]], [[0, 2]], [[-1, 3]]])  # 1 node, 2 nodes, 1 node (-1: no selection)
    np.testing.assert_allclose(distinct_nodes(NODES, ids_TLK), [4 / 3])


def test_distinct_nodes_picks_replicas_on_nodes_the_token_already_visits():
    # 2 slots per GPU; expert 0 only on node 0, expert 3 only on node 1, experts 1 and 2 on both
    p = placement([[0, 1, 2, 1, 2, 3, 1, 3]], experts=4, gpus=4, gpus_per_node=2)
    ids_TLK = np.array([[[0, 1]], [[3, 2]], [[0, 3]], [[1, 2]]])
    # [0, 1] and [3, 2] stay on their single-node expert's node; [0, 3] needs both; [1, 2] one node
    np.testing.assert_allclose(distinct_nodes(p, ids_TLK), [(1 + 1 + 2 + 1) / 4])


def test_group_span_by_hand():
    # 2 nodes of one GPU, 3 slots each; routing groups {0, 1} and {2, 3}
    p = placement([[0, 1, 2, 2, 3, 3]], experts=4, gpus=2, gpus_per_node=1)
    # group 0 lives on node 0 only (span 1), group 1 on both (span 2); weighted by load 30 : 10
    np.testing.assert_allclose(group_span(p, np.array([[10.0, 20.0, 5.0, 5.0]]), n_group=2), [1.25])
    together = placement([[0, 1, 0, 2, 3, 2]], experts=4, gpus=2, gpus_per_node=1)
    np.testing.assert_allclose(group_span(together, np.array([[10.0, 20.0, 5.0, 5.0]]), n_group=2), [1.0])


def test_moves_by_hand():
    old = placement([[0, 1, 2, 3]], experts=4, gpus=2, gpus_per_node=2, expert_bytes=100)
    new = placement([[0, 2, 1, 3]], experts=4, gpus=2, gpus_per_node=2, expert_bytes=100)
    report = moves(old, new)  # GPU 0 receives 2, GPU 1 receives 1; both had a copy on the (one) node
    assert report.experts == 2 and report.bytes == 200 and report.intra_node_L.tolist() == [2]
    two_nodes = moves(placement([[0, 1, 2, 3]], 4, 2, 1), placement([[0, 2, 1, 3]], 4, 2, 1))
    assert two_nodes.experts == 2 and two_nodes.intra_node_L.tolist() == [0]
    assert moves(old, old).experts == 0  # reordering within a GPU moves nothing
    assert moves(old, placement([[1, 0, 3, 2]], 4, 2, 2)).experts == 0
    with pytest.raises(ValueError, match="cannot compare"):
        moves(old, placement([[0, 1, 2, 3, 0, 1]], 4, 2, 2))


def test_evaluate_by_hand():
    # windows: [6, 2, 4] and [0, 6, 6]; equal split over SPLIT's layout
    trace = Trace(np.array([[[6.0, 2.0, 4.0]], [[0.0, 6.0, 6.0]]]), np.array([0]), top_k=1, source="t.safetensors")
    score = evaluate(SPLIT, trace)
    # total [6, 8, 10]: GPU 0 = 3 + 8 = 11, GPU 1 = 10 + 3 = 13, mean 12
    np.testing.assert_allclose(score.imbalance_L, [13 / 12])
    # window 1: GPU 0 = 6, GPU 1 = 6: balanced; window 0 is 7/6
    np.testing.assert_allclose(score.worst_window_L, [7 / 6])
    # best split of the total: GPU 0 = s + 8, GPU 1 = 10 + 6 - s: s = 4 balances
    np.testing.assert_allclose(score.imbalance_best_L, [1.0], atol=1e-9)
    assert score.summary()["balancedness_mean"] == pytest.approx(12 / 13)


def test_align_names_what_does_not_fit():
    trace = Trace(np.ones((1, 2, 3)), np.array([0, 5]), top_k=1, source="t.safetensors")
    both = Placement(np.array([[0, 1, 2, 0], [2, 1, 0, 0]]), 3, Topology(2, 1, 2), np.array([0, 5]), source="hand")
    assert align(both, trace).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"t.safetensors: has 3 experts, the placement hand 4"):
        align(placement([[0, 1, 2, 3]], 4, 2, 1), trace)
    missing = Placement(np.array([[0, 1, 2, 0]]), 3, Topology(2, 1, 2), np.array([7]), source="hand")
    with pytest.raises(ValueError, match=r"t.safetensors: has no counts for layer\(s\) \[7\]"):
        align(missing, trace)
