"""CP-SAT placement of one MoE layer: large-neighbourhood search with exact CP-SAT sub-models.

A whole-layer model (256 experts x 32-72 GPUs x every workload) is too large for CP-SAT to improve
on the greedy warm start within the ~1 s a layer gets (benchmarks/BENCHMARKS.md, "Numbers moved out of
docstrings"), and its LP bound is the trivial 1.0 anyway. So the search goes:

  1. warm start: the scenario-aware greedy (placer.greedy);
  2. swap descent: exchange single replicas between the hottest GPU and any other while that lowers
     the objective (vectorised, cheap, reaches a swap-local optimum fast);
  3. CP-SAT neighbourhoods: the hottest GPU plus a few others (coolest in the hottest workload, and
     random ones) are re-partitioned optimally by CP-SAT, hint = current layout, accepted when the
     objective falls. When the neighbourhood is the whole layer (small problems) the result is
     proven optimal for the given replica counts.

Data -> variables -> constraints -> objective -> solve, in `_neighbourhood_model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from ortools.sat.python import cp_model

from moeplace.placer.layer import Packing

# Items (replicas) in one CP-SAT neighbourhood: big enough to escape swap-local optima, small enough
# to solve to optimality in a few milliseconds.
NEIGHBOURHOOD_ITEMS = 40
# The sub-model's budget in CP-SAT's deterministic time (about seconds of an unloaded core), not wall
# time: with one worker the result then does not depend on how loaded the machine is, so a search
# that ends by its patience gives the same layout every run (migrate.py's monotone choice relies on
# it). Only the whole solve's deadline is wall time.
SUBMODEL_DETERMINISTIC = 0.5


@dataclass(frozen=True)
class SearchStats:
    status: str  # "optimal" (whole layer solved exactly), "improved", "greedy" (nothing better found)
    swaps: int
    neighbourhoods: int
    improvements: int


def improve_layer(packing: Packing, deadline: float, rng: np.random.Generator, patience: int = 40,
                  on_change: Callable[[Packing], None] | None = None) -> SearchStats:
    """Improve `packing` in place until `deadline` (time.monotonic()) or `patience` fruitless tries.
    on_change(packing) is called after every accepted change (a migration path records them)."""
    swaps = swap_descent(packing, deadline, on_change)
    p = packing.problem
    k = int(np.clip(np.ceil(NEIGHBOURHOOD_ITEMS / p.slots_per_gpu), 2, p.num_gpus))
    if k == p.num_gpus:
        status = _solve_neighbourhood(packing, np.arange(p.num_gpus), deadline)
        if status and on_change:
            on_change(packing)
        # The swap descent may already have beaten the greedy even when CP-SAT finds nothing more.
        label = "optimal" if status == "optimal" else "improved" if status or swaps else "greedy"
        return SearchStats(label, swaps, 1, int(bool(status)))
    tried = improved = fruitless = 0
    while time.monotonic() < deadline and fruitless < patience:
        tried += 1
        if _solve_neighbourhood(packing, _pick_neighbourhood(packing, k, rng), deadline):
            improved += 1
            fruitless = 0
            if on_change:
                on_change(packing)
            swaps += swap_descent(packing, deadline, on_change)
        else:
            fruitless += 1
    return SearchStats("improved" if improved or swaps else "greedy", swaps, tried, improved)


def swap_descent(packing: Packing, deadline: float, on_change: Callable[[Packing], None] | None = None) -> int:
    """Exchange one replica of the hottest GPU with one of another GPU while the objective falls (or
    stays the same and the hottest GPU cools, which cannot cycle: the pair's maximum strictly drops)."""
    done = 0
    while time.monotonic() < deadline:
        load_WG, rows = packing.load_WG, packing.gpu_experts
        hot_G = load_WG.max(axis=0)
        g = int(np.argmax(hot_G))
        a = rows[g]                                   # [S] experts on the hottest GPU
        la = packing.load_WE[:, a]                    # [W, S]
        lb = packing.load_WE[:, rows]                 # [W, G, S]
        # new loads for swapping a[i] (on g) with rows[h, j] (on h): [W, S, G, S]
        new_g = load_WG[:, g, None, None, None] - la[:, :, None, None] + lb[:, None]
        new_h = load_WG[:, None, :, None] + la[:, :, None, None] - lb[:, None]
        pair = np.maximum(new_g.max(0), new_h.max(0))  # [S, G, S]
        cost = np.maximum(pair, _max_excluding(hot_G, g)[None, :, None])
        # The deltas change the current traffic and move terms: add those, or `cost` undercuts
        # objective() by them and worse swaps look better (the descent then cycles to the deadline).
        cost += packing.traffic() + packing.move_int * packing.moved()
        cost += _traffic_delta(packing, g, a) + packing.move_int * _moved_delta(packing, g, a)
        forbidden = packing.on_GE[:, a].T[:, :, None] | packing.on_GE[g][rows][None]  # duplicates
        forbidden |= _node_duplicates(packing, g, a)
        forbidden[:, g, :] = True
        cost = np.where(forbidden, np.iinfo(np.int64).max, cost)
        i, h, j = np.unravel_index(np.argmin(cost), cost.shape)
        current = packing.objective()
        better = cost[i, h, j] < current or (cost[i, h, j] == current and pair[i, h, j] < hot_G[g])
        if forbidden[i, h, j] or not better:
            return done
        packing.swap(g, int(i), int(h), int(j))
        done += 1
        if on_change:
            on_change(packing)
    return done


def _node_duplicates(packing: Packing, g: int, a: np.ndarray) -> np.ndarray:
    """[S, G, S] swaps that put a second replica of a spread expert on a node (placer.layer)."""
    spread_E = packing.spread_E()
    if not spread_E.any():
        return np.zeros((len(a), 1, 1), dtype=bool)
    on_NE, node_G, rows = packing.on_NE(), packing.node_G, packing.gpu_experts
    other = node_G != node_G[g]  # [G] a swap within a node changes no node's count
    a_lands = (on_NE[node_G][:, a].T > 0) & spread_E[a][:, None] & other[None, :]  # [S, G]
    b_lands = (on_NE[node_G[g]][rows] > 0) & spread_E[rows] & other[:, None]  # [G, S]
    return a_lands[:, :, None] | b_lands[None]


def _traffic_delta(packing: Packing, g: int, a: np.ndarray) -> np.ndarray:
    """[S, G, S] change of the traffic term when a[i] (on g) swaps with rows[h, j] (on h)."""
    home_E = packing.problem.home_node_E
    if home_E is None or not packing.traffic_E.any():
        return np.zeros((len(a), 1, 1), dtype=np.int64)
    rows, node_G, count_E, w_E = packing.gpu_experts, packing.node_G, packing.home_count_E(), packing.traffic_E
    ng = node_G[g]
    # a leaves node ng for node_G[h]; b = rows[h, j] leaves node_G[h] for ng.
    count_a = count_E[a][:, None] - (home_E[a] == ng)[:, None] + (home_E[a][:, None] == node_G[None, :])  # [S, G]
    count_b = count_E[rows] - (home_E[rows] == node_G[:, None]) + (home_E[rows] == ng)  # [G, S]
    delta_a = w_E[a][:, None] * ((count_a == 0).astype(np.int64) - (count_E[a] == 0)[:, None])
    delta_b = w_E[rows] * ((count_b == 0).astype(np.int64) - (count_E[rows] == 0))
    return delta_a[:, :, None] + delta_b[None]


def _max_excluding(hot_G: np.ndarray, g: int) -> np.ndarray:
    """[G]: for each h, the largest hot_G over GPUs other than g and h."""
    others = hot_G.copy()
    # -1, not iinfo.min: the descending sort below negates, and -iinfo.min overflows to itself
    # (GPU g then sorted first and the true largest other load was lost). Loads are >= 0.
    others[g] = -1
    order = np.argsort(-others, kind="stable")
    first, second = order[0], order[1] if len(order) > 1 else order[0]
    out = np.full(len(hot_G), others[first])
    out[first] = others[second] if len(order) > 1 else 0
    return np.maximum(out, 0)


def _moved_delta(packing: Packing, g: int, a: np.ndarray) -> np.ndarray:
    """[S, G, S] change in moved replicas when a[i] (on g) swaps with rows[h, j] (on h)."""
    old = packing.problem.old_on_GE
    if old is None:
        return np.zeros((len(a), 1, 1), dtype=np.int64)
    rows = packing.gpu_experts
    new_on_g = ~old[g][rows]                            # [G, S] b would be a move onto g
    was_on_g = ~old[g][a]                               # [S]   a was a move onto g
    new_on_h = ~old[np.arange(len(rows))[:, None], a[None, :]].T  # [S, G] a would be a move onto h
    was_on_h = ~np.take_along_axis(old, rows, axis=1)   # [G, S] b was a move onto h
    return (
        new_on_g[None].astype(np.int64)
        - was_on_g[:, None, None]
        + new_on_h[:, :, None]
        - was_on_h[None]
    )


def _pick_neighbourhood(packing: Packing, k: int, rng: np.random.Generator) -> np.ndarray:
    """The hottest GPU, half of the rest from the coolest GPUs in its worst workload, half random."""
    load_WG = packing.load_WG
    g = int(np.argmax(load_WG.max(axis=0)))
    w = int(np.argmax(load_WG[:, g]))
    cool = [h for h in np.argsort(load_WG[w], kind="stable") if h != g]
    n_cool = (k - 1 + 1) // 2
    chosen = list(rng.choice(cool[: max(n_cool, 2 * n_cool)], size=n_cool, replace=False))
    rest = [h for h in range(packing.problem.num_gpus) if h != g and h not in chosen]
    chosen += list(rng.choice(rest, size=k - 1 - n_cool, replace=False))
    return np.array(sorted([g, *chosen]))


def _solve_neighbourhood(packing: Packing, gpus: np.ndarray, deadline: float) -> str:
    """Re-partition the replicas held by `gpus` optimally. Returns "optimal"/"improved" when the
    packing was changed for the better, "" when not."""
    model, x, experts = _neighbourhood_model(packing, gpus)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = max(0.01, deadline - time.monotonic())
    solver.parameters.max_deterministic_time = SUBMODEL_DETERMINISTIC
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # UNKNOWN (time ran out before the hint was even confirmed) keeps the current layout;
        # INFEASIBLE / MODEL_INVALID cannot happen for a re-partition of a valid layout.
        assert status == cp_model.UNKNOWN, solver.StatusName(status)
        return ""
    S = packing.problem.slots_per_gpu
    rows = np.array([[e for e, xe in zip(experts, x[:, j]) if solver.Value(xe)] for j in range(len(gpus))])
    assert rows.shape == (len(gpus), S), rows.shape
    before = (packing.objective(), int(packing.load_WG[:, gpus].max()))
    old_rows = packing.gpu_experts[gpus].copy()
    packing.replace_rows(gpus, rows)
    after = (packing.objective(), int(packing.load_WG[:, gpus].max()))
    if after >= before:
        packing.replace_rows(gpus, old_rows)
        return "optimal" if status == cp_model.OPTIMAL and len(gpus) == packing.problem.num_gpus else ""
    return "optimal" if status == cp_model.OPTIMAL and len(gpus) == packing.problem.num_gpus else "improved"


def _neighbourhood_model(packing: Packing, gpus: np.ndarray) -> tuple[cp_model.CpModel, np.ndarray, np.ndarray]:
    p = packing.problem
    # Data: the replicas held by the neighbourhood, and what the rest of the layer fixes.
    held = packing.gpu_experts[gpus]
    experts, copies = np.unique(held, return_counts=True)
    load_WX = packing.load_WE[:, experts]
    outside = np.setdiff1d(np.arange(p.num_gpus), gpus)
    model = cp_model.CpModel()

    # x[i, j] = 1 iff expert experts[i] sits on GPU gpus[j] (boolean: one replica per GPU at most).
    x = np.array([[model.NewBoolVar(f"x{e}_{g}") for g in gpus] for e in experts])
    # Each expert keeps the number of replicas it had inside the neighbourhood; each GPU stays full.
    for i, n in enumerate(copies):
        model.Add(sum(x[i]) == int(n))
    for j in range(len(gpus)):
        model.Add(sum(x[:, j]) == p.slots_per_gpu)
    # hot >= every workload's load on every neighbourhood GPU.
    hot = model.NewIntVar(0, int(load_WX.sum(1).max()), "hot")
    for w in range(load_WX.shape[0]):
        for j in range(len(gpus)):
            model.Add(cp_model.LinearExpr.WeightedSum(list(x[:, j]), load_WX[w].tolist()) <= hot)
    _spread_constraints(model, packing, gpus, outside, experts, x)
    objective = [hot]
    objective += _traffic_terms(model, packing, gpus, outside, experts, x)
    if packing.move_int:
        new = ~p.old_on_GE[np.ix_(gpus, experts)].T
        objective += [packing.move_int * x[i, j] for i, j in zip(*np.nonzero(new))]
    model.Minimize(sum(objective))
    for i, e in enumerate(experts):
        for j, g in enumerate(gpus):
            model.AddHint(x[i, j], bool(packing.on_GE[g, e]))
    return model, x, experts


def _spread_constraints(model, packing: Packing, gpus, outside, experts, x) -> None:
    """A spread expert gets no more replicas on a node than max(1, what it has there now): never a
    new second one, and a layout that already has one stays feasible (the hint must be)."""
    spread_E = packing.spread_E()
    if not spread_E.any():
        return
    p, node_G = packing.problem, packing.node_G
    on_NE = packing.on_NE()
    outside_NE = np.zeros_like(on_NE)
    np.add.at(outside_NE, node_G[outside], packing.on_GE[outside].astype(np.int64))
    for i, e in enumerate(experts):
        if not spread_E[e]:
            continue
        for n in np.unique(node_G[gpus]):
            inside = [x[i, j] for j in np.nonzero(node_G[gpus] == n)[0]]
            model.Add(sum(inside) + int(outside_NE[n, e]) <= max(1, int(on_NE[n, e])))


def _traffic_terms(model, packing: Packing, gpus, outside, experts, x) -> list:
    """off[i] = 1 iff expert experts[i] ends with no replica on its home node. Only experts whose home
    node is in the neighbourhood and has no replica of them outside it can change; the rest is constant."""
    p = packing.problem
    if p.home_node_E is None or not packing.traffic_E.any():
        return []
    node_of_gpu = packing.node_G[gpus]
    kept_home_outside = np.zeros(p.num_experts, dtype=bool)
    for g in outside:
        kept_home_outside |= packing.on_GE[g] & (p.home_node_E == packing.node_G[g])
    terms = []
    for i, e in enumerate(experts):
        at_home = [x[i, j] for j in np.nonzero(node_of_gpu == p.home_node_E[e])[0]]
        if not at_home or kept_home_outside[e] or packing.traffic_E[e] == 0:
            continue
        off = model.NewBoolVar(f"off{e}")
        model.Add(sum(at_home) + off >= 1)
        terms.append(int(packing.traffic_E[e]) * off)
    return terms
