"""placer/affinity.py: home nodes from routing groups and from co-activation, against hand cases."""

from __future__ import annotations

import numpy as np

from moeplace.placer.affinity import coactivation, coactivation_homes, group_homes


def test_group_homes_pack_heaviest_groups_first_onto_the_lighter_node():
    group_E = np.repeat(np.arange(4), 2)  # 4 groups of 2 experts
    # worst-workload group loads (max over the two workloads per expert): 10, 1, 8, 3
    share_WE = np.array([[5, 5, 0.5, 0.5, 1, 1, 1.5, 1.5],
                         [1, 1, 0.2, 0.2, 4, 4, 0.5, 0.5]])
    # g0 (10) -> node 0, g2 (8) -> node 1, g3 (3) -> node 1 (8 < 10), g1 (1) -> node 0 (node 1 is full)
    np.testing.assert_array_equal(group_homes(share_WE, group_E, 2), [0, 0, 0, 0, 1, 1, 1, 1])


def test_group_homes_give_each_node_a_fair_number_of_groups():
    rng = np.random.default_rng(1)
    group_E = np.repeat(np.arange(8), 4)
    homes = group_homes(rng.random((3, 32)), group_E, 4)
    assert np.bincount(homes[::4], minlength=4).tolist() == [2, 2, 2, 2]
    assert all(len(set(homes[group_E == j])) == 1 for j in range(8))  # a group never splits


def test_coactivation_counts_pairs_and_ignores_empty_choices():
    ids_TK = np.array([[0, 1], [1, 2], [0, 1], [-1, 2]])
    together = coactivation(ids_TK, 3)
    np.testing.assert_array_equal(together, [[0, 2, 0], [2, 0, 1], [0, 1, 0]])


def test_coactivation_homes_keep_cliques_together():
    # experts 0, 2, 4 are always chosen together, and 1, 3, 5: two nodes of three experts each
    ids_TK = np.array([[0, 2, 4], [1, 3, 5]] * 20)
    homes = coactivation_homes(coactivation(ids_TK, 6), np.ones(6), 2)
    assert len(set(homes[[0, 2, 4]])) == 1 and len(set(homes[[1, 3, 5]])) == 1
    assert homes[0] != homes[1]


def test_coactivation_homes_are_a_balanced_partition():
    rng = np.random.default_rng(2)
    ids_TK = rng.integers(0, 16, (200, 4))
    homes = coactivation_homes(coactivation(ids_TK, 16), rng.random(16), 3)
    assert homes.min() >= 0 and np.bincount(homes, minlength=3).max() <= 6  # ceil(16 / 3)
