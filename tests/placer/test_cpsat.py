"""CP-SAT layer search, checked by a validator that knows nothing of the solver: every output is a
legal packing, its hottest GPU load is recomputed from the shares, and tiny layers are compared with
a brute-force enumeration of every packing."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.placer.cpsat import _max_excluding, improve_layer, swap_descent
from moeplace.placer.greedy import pack_for_scenarios, replicate_for_scenarios
from moeplace.placer.layer import SCALE, LayerProblem, Packing


def validate(problem: LayerProblem, gpu_experts_GS: np.ndarray) -> float:
    """The specification of a layer packing; returns its hottest GPU load over all workloads
    (mean GPU load = 1), recomputed from share_WE with plain numpy."""
    G, S, E = problem.num_gpus, problem.slots_per_gpu, problem.num_experts
    rows = np.asarray(gpu_experts_GS)
    assert rows.shape == (G, S), f"{rows.shape} is not {G} GPUs x {S} slots"
    assert ((rows >= 0) & (rows < E)).all(), rows
    for g, row in enumerate(rows.tolist()):
        assert len(set(row)) == S, f"GPU {g} holds two replicas of one expert: {row}"
    count_E = np.bincount(rows.ravel(), minlength=E)
    assert (count_E >= 1).all(), f"experts without a replica: {np.flatnonzero(count_E == 0)}"
    np.testing.assert_array_equal(count_E, problem.replicas_E)
    load_WG = np.zeros((problem.share_WE.shape[0], G))
    for g in range(G):
        for e in rows[g]:
            load_WG[:, g] += problem.share_WE[:, e] * G / count_E[e]
    return float(load_WG.max())


def check(packing: Packing) -> float:
    """Validate a solver's packing, and check its incremental bookkeeping against a fresh one."""
    hottest = validate(packing.problem, packing.gpu_experts)
    # integer loads round each replica by at most half a unit
    assert abs(packing.hottest() / SCALE - hottest) <= packing.problem.slots_per_gpu / SCALE
    fresh = Packing(packing.problem, packing.gpu_experts)
    np.testing.assert_array_equal(fresh.load_WG, packing.load_WG)
    np.testing.assert_array_equal(fresh.on_GE, packing.on_GE)
    assert fresh.objective() == packing.objective()
    assert hottest >= packing.problem.lower_bound() - 1e-4
    return hottest


def make_problem(share_WE, G, S, gpus_per_node=None, **kwargs) -> LayerProblem:
    share_WE = np.asarray(share_WE, dtype=np.float64)
    share_WE = share_WE / share_WE.sum(axis=1, keepdims=True)
    replicas = replicate_for_scenarios(share_WE, G * S, max_replicas=G)
    return LayerProblem(share_WE, replicas, G, gpus_per_node or G, S, **kwargs)


def greedy(problem: LayerProblem, extra_cost_GE=None) -> Packing:
    G, S = problem.num_gpus, problem.slots_per_gpu
    return Packing(problem, pack_for_scenarios(problem.share_WE * G, problem.replicas_E, G, S, extra_cost_GE))


def improve(packing: Packing, seconds: float = 0.3, seed: int = 0):
    return improve_layer(packing, time.monotonic() + seconds, np.random.default_rng(seed))


# ---------------------------------------------------------------- the validator itself


def test_validator_rejects_illegal_packings():
    problem = make_problem([[0.4, 0.3, 0.2, 0.1]], 2, 2)
    assert validate(problem, np.array([[0, 3], [1, 2]])) == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="two replicas"):
        validate(problem, np.array([[0, 0], [1, 2]]))
    with pytest.raises(AssertionError, match="without a replica"):
        validate(problem, np.array([[0, 1], [1, 2]]))
    with pytest.raises(AssertionError, match="2 GPUs x 2 slots"):
        validate(problem, np.array([[0, 1, 2, 3]]))


# ---------------------------------------------------------------- random problems


@st.composite
def layer_problems(draw):
    E = draw(st.integers(4, 24))
    G = draw(st.integers(2, 6))
    S = draw(st.integers(-(-E // G), E))  # E <= G * S <= G * E
    W = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        share = rng.dirichlet(np.full(E, rng.uniform(0.2, 2.0)), size=W)
    else:
        share = rng.lognormal(0.0, rng.uniform(0.3, 1.5), size=(W, E))
    gpus_per_node = draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0]))
    terms = {}
    if draw(st.booleans()) and gpus_per_node < G:  # traffic: random home nodes
        terms.update(home_node_E=rng.integers(0, G // gpus_per_node, E),
                     traffic_weight=draw(st.sampled_from([0.1, 1.0, 5.0])))
    if draw(st.booleans()):  # moves: a random previous layout
        terms.update(old_on_GE=rng.random((G, E)) < S / E, move_weight=draw(st.sampled_from([0.05, 1.0, 10.0])))
    return make_problem(share, G, S, gpus_per_node, **terms)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(layer_problems(), st.integers(0, 3))
def test_improve_layer_is_valid_and_never_worse_than_greedy(problem, seed):
    packing = greedy(problem)
    start_hottest = check(packing)
    start = packing.objective()
    stats = improve(packing, 0.2, seed)
    hottest = check(packing)
    assert packing.objective() <= start
    if problem.home_node_E is None and problem.old_on_GE is None:  # the objective is the hottest load
        assert hottest <= start_hottest + problem.slots_per_gpu / SCALE
    assert stats.status in ("optimal", "improved", "greedy")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(layer_problems())
def test_every_swap_lowers_the_objective_or_cools_the_hottest_gpu(problem):
    """The descent predicts each swap's objective from deltas; the real objective must agree that the
    swap does not make things worse, and the descent must stop by itself (no cycling)."""
    packing = greedy(problem)
    steps = []
    swap = packing.swap

    def recorded_swap(*args):
        before = (packing.objective(), packing.hottest())
        swap(*args)
        steps.append((before, (packing.objective(), packing.hottest())))

    packing.swap = recorded_swap
    done = swap_descent(packing, time.monotonic() + 5)
    check(packing)
    assert done == len(steps) < 10 * problem.num_gpus * problem.slots_per_gpu
    for (obj_before, hot_before), (obj_after, hot_after) in steps:
        assert obj_after < obj_before or (obj_after == obj_before and hot_after <= hot_before)


def test_max_excluding_by_hand():
    # For each h: the hottest GPU other than g = 2 and h. h = 0 leaves GPU 1 (6), h = 1 leaves GPU 0
    # (5), h = 3 leaves max(5, 6) = 6; h = 2 is g itself and never used.
    assert _max_excluding(np.array([5, 6, 9, 1]), 2).tolist()[:2] == [6, 5]
    assert _max_excluding(np.array([5, 6, 9, 1]), 2)[3] == 6
    assert _max_excluding(np.array([4, 7]), 1)[0] == 0  # no third GPU


@pytest.mark.parametrize("seed", range(3))
def test_swap_descent_never_raises_the_objective(seed):
    rng = np.random.default_rng(seed)
    problem = make_problem(rng.lognormal(0, 1, size=(3, 48)), 12, 6, 4)
    packing = greedy(problem)
    before = packing.objective()
    swap_descent(packing, time.monotonic() + 5)
    check(packing)
    assert packing.objective() <= before


@pytest.mark.parametrize("seed", range(2))
def test_large_layer_search_improves_a_poor_start(seed):
    """A round-robin layout is far from balanced; the search must leave it valid and cooler."""
    rng = np.random.default_rng(50 + seed)
    E, G, S = 64, 8, 9
    problem = make_problem(rng.lognormal(0, 1, size=(4, E)), G, S, 4)
    robin = np.repeat(np.arange(E), problem.replicas_E).reshape(S, G).T
    packing = Packing(problem, robin)
    before = check(packing)
    stats = improve(packing, 0.5, seed)
    assert check(packing) < before
    assert stats.status == "improved" and stats.neighbourhoods >= 1


# ---------------------------------------------------------------- brute force on tiny layers


def brute_force_hottest(problem: LayerProblem) -> int:
    """Smallest integer hottest load over every packing with the problem's replica counts."""
    G, S, E = problem.num_gpus, problem.slots_per_gpu, problem.num_experts
    load_WE = problem.replica_load_WE()
    best = None
    for rows in itertools.product(itertools.combinations(range(E), S), repeat=G):
        if (np.bincount(np.ravel(rows), minlength=E) != problem.replicas_E).any():
            continue
        hottest = int(load_WE[:, np.array(rows)].sum(axis=2).max())
        best = hottest if best is None else min(best, hottest)
    return best


TINY = [(4, 2, 2), (4, 2, 3), (4, 3, 2), (5, 2, 3), (6, 3, 2)]


@pytest.mark.parametrize("E, G, S", TINY)
@pytest.mark.parametrize("seed", range(4))
def test_whole_layer_neighbourhood_is_optimal(E, G, S, seed):
    rng = np.random.default_rng(1000 * seed + 10 * E + G + S)
    W = 1 + seed % 3
    share = rng.lognormal(0.0, 1.0, size=(W, E)) if seed % 2 else rng.dirichlet(np.ones(E), size=W)
    problem = make_problem(share, G, S)
    packing = greedy(problem)
    stats = improve(packing, 5.0, seed)
    assert stats.status == "optimal"
    hottest = check(packing)
    best = brute_force_hottest(problem)
    assert packing.hottest() == best
    assert hottest == pytest.approx(best / SCALE, abs=S / SCALE)


def test_brute_force_finds_what_greedy_misses():
    """A case where the greedy is not optimal, so the optimality test above has teeth. Loads 4 2 2 2 1 1
    on 2 GPUs x 3 slots: greedy puts 4 on GPU 0, the first two 2s on GPU 1 (2, 4), the third 2 on
    GPU 0 (tie 6 / 6), a 1 on GPU 1 (5 < 7, now full) and the last 1 on GPU 0: 7 against 5, hottest
    7 / 6. Optimal: {4, 1, 1} and {2, 2, 2}, 6 each, hottest 1.0."""
    problem = make_problem([[4.0, 2.0, 2.0, 2.0, 1.0, 1.0]], 2, 3)
    assert problem.replicas_E.tolist() == [1, 1, 1, 1, 1, 1]
    packing = greedy(problem)
    assert packing.gpu_experts.tolist() == [[0, 3, 5], [1, 2, 4]]
    assert check(packing) == pytest.approx(7 / 6)
    assert improve(packing, 5.0).status == "optimal"
    assert check(packing) == pytest.approx(1.0, abs=1e-4)
    assert packing.hottest() == brute_force_hottest(problem)
    assert sorted(map(sorted, packing.gpu_experts.tolist())) == [[0, 4, 5], [1, 2, 3]]


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
