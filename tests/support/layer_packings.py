"""Layer packings for the CP-SAT search's tests: a validator that knows nothing of the solver (the
specification), small problems built from shares, and the greedy start and the search with short limits."""

from __future__ import annotations

import time

import numpy as np

from moeplace.placer.cpsat import improve_layer
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
