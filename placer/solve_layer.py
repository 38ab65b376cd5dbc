"""One layer's solve, run in a worker process: replica counts, greedy warm start, CP-SAT search and,
with an old layout, the migration path; and the process pool that runs the layers.

Separate from `moeplace.placer.solve`, which checks the request, splits the time budget, and assembles
the layers into one `Placement` (re-packing, slot keeping, final reports).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from moeplace.placer.cpsat import improve_layer
from moeplace.placer.dispatch import Dispatch
from moeplace.placer.greedy import pack_for_scenarios, replicate_for_scenarios
from moeplace.placer.layer import SCALE, LayerProblem, Packing
from moeplace.placer.affinity import coactivation, coactivation_homes, group_homes
from moeplace.placer.migrate import choose, path_from_old, snapshot
from moeplace.placer.solve_types import LayerReport, Method, SolveOptions
from moeplace.topology import Topology


@dataclass(frozen=True)
class _LayerTask:
    index: int
    layer: int
    share_WE: np.ndarray
    topology: Topology
    group_E: np.ndarray | None
    topk_ids_TK: np.ndarray | None
    old_GS: np.ndarray | None  # the old layout of this layer [G, S], or None
    options: SolveOptions
    seconds: float


def _solve_layer(task: _LayerTask) -> tuple[int, np.ndarray, LayerReport, np.ndarray | None]:
    start = time.monotonic()
    topo, opts = task.topology, task.options
    replicas_E = replicate_for_scenarios(task.share_WE, topo.num_slots, max_replicas=topo.num_gpus)
    old_on_GE = None
    if task.old_GS is not None:
        old_on_GE = np.zeros((topo.num_gpus, len(replicas_E)), dtype=bool)
        old_on_GE[np.arange(topo.num_gpus)[:, None], task.old_GS] = True
    home_node_E = _home_nodes(task)
    problem = LayerProblem(
        share_WE=task.share_WE,
        replicas_E=replicas_E,
        num_gpus=topo.num_gpus,
        gpus_per_node=topo.gpus_per_node,
        slots_per_gpu=topo.slots_per_gpu,
        home_node_E=home_node_E,
        old_on_GE=old_on_GE,
        traffic_weight=opts.traffic_weight,
        move_weight=0.0,  # with an old layout, moves are weighed in migrate.choose (monotone in the weight)
        spread_nodes=opts.dispatch is Dispatch.sglang_static,
    )
    hint = pack_for_scenarios(problem.share_WE * topo.num_gpus, replicas_E, topo.num_gpus, topo.slots_per_gpu,
                              _greedy_costs(problem), topo.gpus_per_node if problem.spread_nodes else 0)
    packing = Packing(problem, hint)
    greedy_hottest = packing.hottest() / SCALE
    status = "greedy"
    rng = np.random.default_rng([opts.seed, task.index])
    share = 0.5 if task.old_GS is not None and opts.method is Method.cpsat else 1.0
    if opts.method is Method.cpsat:
        status = improve_layer(packing, start + task.seconds * share, rng).status
    chosen = snapshot(packing, status)
    if task.old_GS is not None:
        path = path_from_old(problem, task.old_GS, start + task.seconds if share < 1 else start, rng)
        chosen = choose([*path, chosen], opts.move_weight, problem.num_experts)
    report = LayerReport(
        layer=task.layer,
        hottest=chosen.hottest / SCALE,
        off_home=_off_home(problem, chosen.gpu_experts_GS),
        moved=chosen.moved,
        objective=chosen.base / SCALE + opts.move_weight * chosen.moved / problem.num_experts,
        greedy_hottest=greedy_hottest,
        bound=problem.lower_bound(),
        status=chosen.label,
        seconds=time.monotonic() - start,
    )
    return task.index, np.sort(chosen.gpu_experts_GS, axis=1), report, home_node_E


def _off_home(problem: LayerProblem, rows_GS: np.ndarray) -> float:
    """Share of routed (token, expert) pairs whose expert has no replica on its home node."""
    if problem.home_node_E is None:
        return 0.0
    node_G = np.arange(problem.num_gpus) // problem.gpus_per_node
    home = np.zeros(problem.num_experts, dtype=bool)
    for g, row in enumerate(rows_GS):
        home[row[problem.home_node_E[row] == node_G[g]]] = True
    return float(problem.share_WE.mean(0)[~home].sum())


def _home_nodes(task: _LayerTask) -> np.ndarray | None:
    """Home node per expert for the traffic term: from sampled co-activation when the traces have
    per-token samples, else from the model's routing groups; None on one node or without either."""
    topo = task.topology
    if topo.num_nodes == 1:
        return None
    if task.topk_ids_TK is not None:
        together = coactivation(task.topk_ids_TK, len(task.share_WE[0]))
        return coactivation_homes(together, task.share_WE.mean(axis=0), topo.num_nodes)
    if task.group_E is not None:
        return group_homes(task.share_WE, task.group_E, topo.num_nodes)
    return None


def _greedy_costs(problem: LayerProblem) -> np.ndarray | None:
    """[G, E] per-replica costs for the greedy, in load units: moving an expert onto a GPU that did
    not hold it, and putting a replica off its home node (its share of the traffic weight)."""
    G, E = problem.num_gpus, problem.num_experts
    cost_GE = np.zeros((G, E))
    if problem.old_on_GE is not None:
        cost_GE += problem.move_weight_int() / SCALE * ~problem.old_on_GE
    if problem.home_node_E is not None:
        node_G = np.arange(G) // problem.gpus_per_node
        away_GE = node_G[:, None] != problem.home_node_E[None, :]
        cost_GE += away_GE * (problem.traffic_weight_E() / SCALE / problem.replicas_E)
    return cost_GE if cost_GE.any() else None


def _run(tasks: list[_LayerTask], workers: int, on_layer_done) -> list[tuple]:
    out: dict[int, tuple] = {}
    if workers <= 1:
        for task in tasks:
            i, *result = _solve_layer(task)
            out[i] = tuple(result)
            if on_layer_done:
                on_layer_done(i)
    else:
        # fork: workers start in milliseconds instead of re-importing numpy and ortools; every task is
        # submitted before the caller's progress display starts its refresh thread.
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_solve_layer, t) for t in tasks]
            for future in as_completed(futures):
                i, *result = future.result()
                out[i] = tuple(result)
                if on_layer_done:
                    on_layer_done(i)
    return [out[i] for i in range(len(tasks))]


def _workers(options: SolveOptions, num_layers: int) -> int:
    return max(1, min(options.workers or os.cpu_count() or 1, num_layers))
