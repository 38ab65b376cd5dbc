"""CP-SAT layer search, checked by a validator that knows nothing of the solver: every output is a
legal packing, its hottest GPU load is recomputed from the shares, and tiny layers are compared with
a brute-force enumeration of every packing (the validator: tests/support/layer_packings.py). The
traffic and move terms are tested in test_cpsat_terms.py."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layer_packings import check, greedy, improve, make_problem, validate
from moeplace.placer.cpsat import _max_excluding, swap_descent
from moeplace.placer.layer import SCALE, LayerProblem, Packing


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
