"""`solve`: traces + topology -> Placement, one layer at a time, layers spread over processes.

Per layer: workloads -> replica counts (worst workload) -> greedy packing (warm start) -> CP-SAT
search (placer.cpsat) within the layer's share of the time limit. `Method.greedy` stops after the
warm start; `Method.eplb` runs DeepSeek EPLB's policy on the mean workload (the baseline engines ship:
hierarchical when the routing groups divide over the nodes), `Method.eplb_global` its global policy.
The per-layer work is in `moeplace.placer.solve_layer`, the option and result types in
`moeplace.placer.solve_types` (also importable from here, as `solve`'s parameters).
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, replace
from typing import Callable

import numpy as np

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch, DispatchModel, dispatch_model
from moeplace.placer.evaluate import gpu_load_LG, imbalance, robust_split
from moeplace.placer.greedy import rebalance_experts
from moeplace.placer.solve_layer import _LayerTask, _run, _workers
from moeplace.placer.solve_types import LayerReport, Method, SolveOptions, SolveResult
from moeplace.placer.static_repair import follow_slots, repair_placement
from moeplace.placer.traffic import draw_tokens, remote_nodes_L
from moeplace.placer.workloads import routing_groups, token_samples, workload_shares
from moeplace.topology import Topology
from moeplace.trace import Trace


def solve(
    traces: list[Trace],
    topology: Topology,
    options: SolveOptions = SolveOptions(),
    old: Placement | None = None,
    on_layer_done: Callable[[int], None] | None = None,
) -> SolveResult:
    """Plan a placement for every MoE layer of the traces (all must share layers and experts)."""
    start = time.monotonic()
    share_WLE, names = workload_shares(traces, options.max_workloads)
    first = traces[0]
    E, L = first.num_experts, first.num_layers
    _check_request(first, topology, old)
    group_E = routing_groups(first)
    samples_TLK = token_samples(traces)
    if options.method in (Method.eplb, Method.eplb_global):
        groups = max(first.n_group, 1) if options.method is Method.eplb else 1
        rows, reports = _solve_eplb(share_WLE, topology, first, groups)
        homes = None
    else:
        left = options.time_limit - (time.monotonic() - start) - _overhead(L)
        budget = max(0.05, left - _static_reserve(options, topology, first, left))
        tasks = [
            _LayerTask(
                index=l,
                layer=int(first.layers[l]),
                share_WE=share_WLE[:, l],
                topology=topology,
                group_E=group_E,
                topk_ids_TK=None if samples_TLK is None else samples_TLK[:, l],
                old_GS=None if old is None else old.phy2log_LP[l].reshape(topology.num_gpus, -1),
                options=options,
                seconds=budget * _workers(options, L) / L,
            )
            for l in range(L)
        ]
        results = _run(tasks, _workers(options, L), on_layer_done)
        rows = np.stack([r[0] for r in results])
        reports = [r[1] for r in results]
        homes = [r[2] for r in results]
    static = None  # SGLang's tables, simulated once and carried through the re-packing
    if options.dispatch is Dispatch.sglang_static and options.method in (Method.cpsat, Method.greedy):
        rows, static = repair_placement(rows, share_WLE, topology, first, homes, old,
                                      start + options.time_limit - _overhead(L))
    if old is not None and options.method in (Method.cpsat, Method.greedy):
        kept = np.stack([_keep_slots(r, o.reshape(topology.num_gpus, -1)) for r, o in zip(rows, old.phy2log_LP)])
        static = None if static is None else follow_slots(static, rows.reshape(L, -1), kept.reshape(L, -1), topology)
        rows = kept
    placement = Placement(
        phy2log_LP=rows.reshape(L, -1),
        num_experts=E,
        topology=topology,
        layers=first.layers,
        num_model_layers=first.num_model_layers,
        provenance={},
    )
    if options.dispatch is Dispatch.split and options.method in (Method.cpsat, Method.greedy):
        placement = replace(placement, split_LP=robust_split(placement, share_WLE)[1])
    reports = _final_reports(placement, share_WLE, traces, static or dispatch_model(placement, options.dispatch),
                             reports)
    placement = placement.with_provenance(**_provenance(traces, names, options, reports, old))
    return SolveResult(placement, tuple(reports), tuple(names), time.monotonic() - start)


def _final_reports(placement: Placement, share_WLE: np.ndarray, traces: list[Trace], model: DispatchModel,
                   reports: list[LayerReport]) -> list[LayerReport]:
    """Each layer's hottest under the dispatch rule (exact for sglang-static) and its expected remote
    nodes per token on the planning workloads."""
    G = placement.topology.num_gpus
    hottest_L = np.max([imbalance(gpu_load_LG(placement, share_LE * G, model.shares_LP)) for share_LE in share_WLE],
                       axis=0)
    ids_TLK = draw_tokens(traces, share_WLE.mean(axis=0))
    remote_L = remote_nodes_L(placement, ids_TLK, model.shares_LP, model.choice_GLE)
    return [replace(r, hottest=float(h), remote_nodes=float(n)) for r, h, n in zip(reports, hottest_L, remote_L)]


def _check_request(trace: Trace, topology: Topology, old: Placement | None) -> None:
    E = trace.num_experts
    if topology.num_slots < E:
        raise ValueError(
            f"{topology.num_slots} slots ({topology.num_gpus} GPUs x {topology.slots_per_gpu}) are fewer "
            f"than the {E} experts of {trace.source}: every expert needs a slot"
        )
    if topology.num_gpus * E < topology.num_slots:
        raise ValueError(
            f"{topology.num_slots} slots exceed {topology.num_gpus} GPUs x {E} experts: "
            "filling them would put two replicas of one expert on a GPU"
        )
    if old is None:
        return
    if old.num_experts != E or not np.array_equal(old.layers, trace.layers):
        raise ValueError(f"{old.source}: placement is for {old.num_experts} experts on layers "
                         f"{old.layers.tolist()[:3]}..., not the traces' {E} experts")
    if (old.topology.num_gpus, old.topology.slots_per_gpu) != (topology.num_gpus, topology.slots_per_gpu):
        raise ValueError(
            f"{old.source}: placement has {old.topology.num_gpus} GPUs x {old.topology.slots_per_gpu} slots, "
            f"the request {topology.num_gpus} x {topology.slots_per_gpu}"
        )


def _static_reserve(options: SolveOptions, topology: Topology, trace: Trace, left: float) -> float:
    """Seconds kept for simulating SGLang's tables (one Python shuffle per rank and replicated expert
    it has no near copy of: about 2.5 us x rows x redundant slots x G^1.5 on this project's CPU) and
    for the re-packing after it; at most 70% of what is left."""
    if options.dispatch is not Dispatch.sglang_static:
        return 0.0
    rows = trace.num_model_layers or trace.num_layers
    simulate = 2.5e-6 * rows * max(topology.num_slots - trace.num_experts, 1) * topology.num_gpus ** 1.5
    return min(0.7 * left, 3 * simulate + 0.15 * left)


def _overhead(num_layers: int) -> float:
    """Seconds kept back for start-up of workers and assembling the result."""
    return 0.5 + 0.01 * num_layers


def _keep_slots(new_GS: np.ndarray, old_GS: np.ndarray) -> np.ndarray:
    """Order each GPU's experts so that an expert that stays keeps its old slot (a reshard then
    leaves that slot untouched); new experts fill the freed slots in ascending order."""
    out = np.full_like(new_GS, -1)
    for g, (new, old) in enumerate(zip(new_GS, old_GS)):
        # Only the first old copy of an expert stays: an old layout (EPLB's) may hold two copies of
        # one expert on a GPU, and the second slot must go to a new expert.
        first = np.zeros(len(old), dtype=bool)
        first[np.unique(old, return_index=True)[1]] = True
        stays = np.isin(old, new) & first
        out[g, stays] = old[stays]
        out[g, ~stays] = np.sort(new[~np.isin(new, old)])
    assert (out >= 0).all()
    assert sorted(out.ravel().tolist()) == sorted(new_GS.ravel().tolist()), "not a reordering of the new rows"
    return out


def _solve_eplb(share_WLE: np.ndarray, topology: Topology, trace: Trace, groups: int) -> tuple[np.ndarray, list[LayerReport]]:
    weight_LE = share_WLE.mean(axis=0)
    nodes = topology.num_nodes if groups > 1 else 1
    phy2log, _, _ = rebalance_experts(weight_LE, topology.num_slots, groups, nodes, topology.num_gpus)
    # EPLB has no greedy start, bound or objective of ours: NaN there (tables print "-"); its hottest is
    # filled in by _final_reports like every method's.
    reports = [LayerReport(layer=int(layer), hottest=float("nan"), off_home=0.0, moved=0,
                           objective=float("nan"), greedy_hottest=float("nan"), bound=float("nan"),
                           status="eplb", seconds=0.0)
               for layer in trace.layers]
    return phy2log, reports


def _provenance(traces, names, options: SolveOptions, reports, old: Placement | None) -> dict:
    return {
        "solver": f"moeplace-{options.method.value}",
        "traces": [{"file": t.source, "sha256_16": t.digest()} for t in traces],
        "workloads": list(names),
        "options": {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(options).items()},
        "from": None if old is None else old.source,
        "layers": {
            "hottest": [round(r.hottest, 5) for r in reports],
            "bound": [None if np.isnan(r.bound) else round(r.bound, 5) for r in reports],
            "status": [r.status for r in reports],
        },
    }
