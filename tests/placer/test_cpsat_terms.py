"""CP-SAT layer search with its extra terms: the traffic term keeps experts on their home node, the move
term keeps an old layout. Every output is checked by the solver-free validator of
tests/support/layer_packings.py; the search itself is tested in test_cpsat.py."""

from __future__ import annotations

import numpy as np
import pytest

from layer_packings import check, greedy, improve, make_problem
from moeplace.placer.layer import SCALE, LayerProblem, Packing


# ---------------------------------------------------------------- traffic term


def traffic_case(traffic_weight: float) -> LayerProblem:
    # Experts 0-3 (home node 0) carry 0.2 each, experts 4-7 (home node 1) 0.05 each; 4 GPUs x 2 slots
    # in 2 nodes. The only layouts with hottest 1.0 pair one heavy with one light expert per GPU,
    # which sends two heavy experts (0.4 of the tokens) and two light ones (0.1) away from home.
    return LayerProblem(
        share_WE=np.array([[0.2] * 4 + [0.05] * 4]),
        replicas_E=np.ones(8, dtype=np.int64),
        num_gpus=4,
        gpus_per_node=2,
        slots_per_gpu=2,
        home_node_E=np.array([0, 0, 0, 0, 1, 1, 1, 1]),
        traffic_weight=traffic_weight,
    )


def test_traffic_weight_keeps_experts_home():
    balanced = greedy(traffic_case(0.0))
    assert improve(balanced, 5.0).status == "optimal"
    assert check(balanced) == pytest.approx(1.0, abs=1e-4)
    assert balanced.off_home_share() == pytest.approx(0.5)
    assert balanced.traffic() == 0  # weight 0: the term is off

    local = greedy(traffic_case(10.0))
    assert improve(local, 5.0).status == "optimal"
    assert local.off_home_share() == 0.0
    assert check(local) == pytest.approx(1.6, abs=1e-4)  # every heavy expert on node 0's 2 GPUs


@pytest.mark.parametrize("seed", range(3))
def test_traffic_weight_lowers_off_home_share_on_random_layers(seed):
    rng = np.random.default_rng(300 + seed)
    E, G = 32, 8
    share = rng.lognormal(0, 1, size=(2, E))
    home = np.repeat(np.arange(2), E // 2)  # 4 groups of 8 experts, 2 per node
    results = {}
    for weight in (0.0, 5.0):
        packing = greedy(make_problem(share, G, 5, 4, home_node_E=home, traffic_weight=weight))
        improve(packing, 0.3, seed)
        check(packing)
        results[weight] = packing.off_home_share()
    assert results[5.0] < results[0.0]


# ---------------------------------------------------------------- move term


def on_gpu(rows_GS: np.ndarray, E: int) -> np.ndarray:
    on_GE = np.zeros((rows_GS.shape[0], E), dtype=bool)
    np.put_along_axis(on_GE, rows_GS, True, axis=1)
    return on_GE


@pytest.mark.parametrize("seed", range(3))
def test_balanced_old_packing_is_kept_on_a_whole_layer(seed):
    rng = np.random.default_rng(400 + seed)
    share = rng.dirichlet(np.ones(8), size=2)
    best = greedy(make_problem(share, 4, 3))
    assert improve(best, 5.0).status == "optimal"
    # Relabel the GPUs: just as balanced, but not where the greedy would put anything.
    old_rows = best.gpu_experts[::-1].copy()
    problem = make_problem(share, 4, 3, old_on_GE=on_gpu(old_rows, 8), move_weight=10.0)
    packing = greedy(problem)
    assert improve(packing, 5.0).status == "optimal"
    check(packing)
    assert packing.moved() == 0
    assert packing.hottest() == best.hottest()
    assert [sorted(r) for r in packing.gpu_experts.tolist()] == [sorted(r) for r in old_rows.tolist()]


@pytest.mark.parametrize("seed", range(2))
def test_large_move_weight_keeps_an_old_layout_in_a_large_layer(seed):
    rng = np.random.default_rng(500 + seed)
    E, G, S = 40, 8, 6
    share = rng.lognormal(0, 1, size=(3, E))
    old = greedy(make_problem(share, G, S)).gpu_experts
    problem = make_problem(share, G, S, 4, old_on_GE=on_gpu(old, E), move_weight=100.0)
    packing = Packing(problem, old)
    improve(packing, 0.3, seed)
    check(packing)
    assert packing.moved() == 0


@pytest.mark.parametrize("seed", range(3))
def test_move_weight_moves_no_more_than_none(seed):
    rng = np.random.default_rng(600 + seed)
    E, G, S = 32, 8, 5
    old = greedy(make_problem(rng.lognormal(0, 1, size=(2, E)), G, S)).gpu_experts  # yesterday's load
    share = rng.lognormal(0, 1, size=(2, E))  # today's
    moved = {}
    for weight in (0.0, 2.0):
        problem = make_problem(share, G, S, 4, old_on_GE=on_gpu(old, E), move_weight=weight)
        extra = problem.move_weight_int() / SCALE * ~problem.old_on_GE  # as solve() warm-starts
        packing = greedy(problem, extra if weight else None)
        improve(packing, 0.3, seed)
        check(packing)
        moved[weight] = packing.moved()
    assert moved[2.0] <= moved[0.0]
    assert moved[0.0] > 0
