"""Solver-agnostic scoring of a placement on traces: the specification every solver is held to.

Imbalance = max GPU load / mean GPU load (1.0 is perfect); balancedness = its inverse (SGLang's and
vLLM's metric). Each expert's tokens are split over its replicas by a dispatch rule (placer.dispatch:
equal, the placement's own split, or SGLang's static tables); "best" splits them to minimise the
hottest GPU (a linear program: the floor for any rule). Traffic: expected distinct remote nodes per
token under the same rule (placer.traffic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch, DispatchModel, dispatch_model
from moeplace.placer.traffic import remote_nodes_L, token_sample
from moeplace.trace import Trace


@dataclass(frozen=True)
class TraceScore:
    """Scores of one placement on one trace; arrays are per MoE layer [L]."""

    name: str
    dispatch: Dispatch
    imbalance_L: np.ndarray  # under `dispatch`
    imbalance_best_L: np.ndarray
    worst_window_L: np.ndarray | None  # worst window's imbalance under `dispatch`, when it has several
    remote_nodes_L: np.ndarray  # expected distinct remote nodes per token under `dispatch`
    tokens_from: str  # where the tokens of remote_nodes_L came from (placer.traffic.TokenSample.source)
    group_span_L: np.ndarray | None = None  # nodes a routing group spans, weighted by its load (n_group > 1)

    def summary(self) -> dict:
        out = {
            "trace": self.name,
            "dispatch": self.dispatch.value,
            "imbalance_mean": float(self.imbalance_L.mean()),
            "imbalance_worst_layer": float(self.imbalance_L.max()),
            "balancedness_mean": float((1 / self.imbalance_L).mean()),
            "best_split_imbalance_mean": float(self.imbalance_best_L.mean()),
            "best_split_imbalance_worst_layer": float(self.imbalance_best_L.max()),
            "remote_nodes_per_token": float(self.remote_nodes_L.mean()),
            "remote_nodes_from": self.tokens_from,
        }
        if self.worst_window_L is not None:
            out["worst_window_imbalance_mean"] = float(self.worst_window_L.mean())
        if self.group_span_L is not None:
            out["group_node_span"] = float(self.group_span_L.mean())
        return out


@dataclass(frozen=True)
class MoveReport:
    """Experts that must be copied to go from one placement to another, per layer [L]."""

    experts_L: np.ndarray
    intra_node_L: np.ndarray  # a copy of the expert already sits on the receiving node
    expert_bytes: int

    @property
    def experts(self) -> int:
        return int(self.experts_L.sum())

    @property
    def bytes(self) -> int:
        return self.experts * self.expert_bytes


def gpu_load_LG(placement: Placement, load_LE: np.ndarray, split_LP: np.ndarray | None = None) -> np.ndarray:
    """[L, G] load of each GPU. load_LE [L, E]; split_LP [L, P] share of its expert per replica
    (None: equal split)."""
    rows = np.arange(placement.num_layers)[:, None]
    if split_LP is None:
        split_LP = 1.0 / placement.replica_count_LE[rows, placement.phy2log_LP]
    per_slot_LP = load_LE[rows, placement.phy2log_LP] * split_LP
    topo = placement.topology
    return per_slot_LP.reshape(placement.num_layers, topo.num_gpus, topo.slots_per_gpu).sum(axis=2)


def imbalance(load_LG: np.ndarray) -> np.ndarray:
    """[L] max / mean; a layer with no load counts as perfectly balanced."""
    mean = load_LG.mean(axis=1)
    return np.where(mean > 0, load_LG.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)


def best_split(placement: Placement, load_LE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, split each expert's load across its replicas to minimise the hottest GPU.

    Returns imbalance_L [L] and split_LP [L, P] (share of its expert each replica takes)."""
    return robust_split(placement, load_LE[None])


def robust_split(placement: Placement, load_WLE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, one split of each expert over its replicas minimising the hottest GPU of the worst
    workload (what `solve --dispatch split` writes into the placement for the runtime to follow).

    load_WLE [W, L, E]. Returns the worst workload's imbalance_L [L] and split_LP [L, P]."""
    imb, split = np.ones(placement.num_layers), np.zeros(placement.phy2log_LP.shape)
    for l in range(placement.num_layers):
        imb[l], split[l] = _best_split_layer(placement, l, load_WLE[:, l])
    return imb, split


def _best_split_layer(placement: Placement, l: int, load_WE: np.ndarray) -> tuple[float, np.ndarray]:
    phy2log = placement.phy2log_LP[l]
    P, S = len(phy2log), placement.topology.slots_per_gpu
    equal = 1.0 / placement.replica_count_LE[l, phy2log]
    mean_W = load_WE.sum(axis=1) / placement.topology.num_gpus
    if not (mean_W > 0).any():
        return 1.0, equal
    from ortools.linear_solver import pywraplp  # here, so importing the scorer needs no ortools

    # Each workload scaled to mean GPU load 1 keeps the LP well conditioned whatever the token counts.
    scaled_WE = load_WE[mean_W > 0] / mean_W[mean_W > 0, None]
    solver = pywraplp.Solver.CreateSolver("GLOP")
    # s[p] = share of its expert slot p takes; hot >= every workload's load on every GPU.
    share = [solver.NumVar(0.0, 1.0, f"s{p}") for p in range(P)]
    hot = solver.NumVar(0.0, solver.infinity(), "hot")
    for e in np.unique(phy2log):
        solver.Add(sum(share[p] for p in np.nonzero(phy2log == e)[0]) == 1.0)
    for scaled_E in scaled_WE:
        weight_P = scaled_E[phy2log]
        for g in range(placement.topology.num_gpus):
            solver.Add(sum(float(weight_P[p]) * share[p] for p in range(g * S, (g + 1) * S)) <= hot)
    solver.Minimize(hot)
    status = solver.Solve()
    assert status == pywraplp.Solver.OPTIMAL, f"best-split LP of layer {l} ended with status {status}"
    split = np.clip(np.array([v.solution_value() for v in share]), 0.0, 1.0)
    sums = np.bincount(phy2log, weights=split, minlength=placement.num_experts)
    return hot.solution_value(), split / sums[phy2log]


def distinct_nodes(placement: Placement, topk_ids_TLK: np.ndarray) -> np.ndarray:
    """[L] mean distinct nodes a sampled token's experts are served from, choosing replicas the way
    the runtime does: nodes of single-node experts first, then a replica on a node the token already
    visits, else the node that serves most of its remaining experts."""
    topo = placement.topology
    node_P = np.arange(topo.num_slots) // topo.slots_per_gpu // topo.gpus_per_node
    out = np.zeros(placement.num_layers)
    for l in range(placement.num_layers):
        mask_E = np.zeros(placement.num_experts, dtype=np.int64)
        np.bitwise_or.at(mask_E, placement.phy2log_LP[l], 1 << node_P)
        ids = topk_ids_TLK[:, l]
        masks = np.where(ids >= 0, mask_E[np.maximum(ids, 0)], 0)  # [T, K] bit n = node n has a replica
        out[l] = _greedy_cover(masks, topo.num_nodes).mean() if len(ids) else 0.0
    return out


def _greedy_cover(masks_TK: np.ndarray, num_nodes: int) -> np.ndarray:
    single = (masks_TK & (masks_TK - 1)) == 0
    visited = np.bitwise_or.reduce(np.where(single, masks_TK, 0), axis=1)
    bits = 1 << np.arange(num_nodes)
    for _ in range(masks_TK.shape[1]):
        open_TK = (masks_TK & visited[:, None]) == 0
        open_TK &= masks_TK != 0
        if not open_TK.any():
            break
        serves_TN = ((masks_TK[:, :, None] & bits) != 0) & open_TK[:, :, None]
        best = np.argmax(serves_TN.sum(axis=1), axis=1)
        visited |= np.where(open_TK.any(axis=1), bits[best], 0)
    return np.array([bin(v).count("1") for v in visited])


def group_span(placement: Placement, load_LE: np.ndarray, n_group: int) -> np.ndarray:
    """[L] nodes holding experts of a routing group, averaged over groups weighted by their load.
    With group-limited routing (a token uses topk_group of n_group groups) this bounds the nodes a
    token reaches per group: 1.0 means every group lives on one node."""
    topo = placement.topology
    E = placement.num_experts
    group_E = np.arange(E) // (E // n_group)
    node_P = np.arange(topo.num_slots) // topo.slots_per_gpu // topo.gpus_per_node
    out = np.zeros(placement.num_layers)
    for l in range(placement.num_layers):
        on_JN = np.zeros((n_group, topo.num_nodes), dtype=bool)
        on_JN[group_E[placement.phy2log_LP[l]], node_P] = True
        load_J = np.bincount(group_E, weights=load_LE[l], minlength=n_group)
        out[l] = on_JN.sum(1) @ load_J / max(load_J.sum(), 1e-300)
    return out


def moves(old: Placement, new: Placement) -> MoveReport:
    """Experts each GPU must receive: (expert, GPU) pairs in `new` whose GPU lacked that expert in `old`."""
    if old.phy2log_LP.shape != new.phy2log_LP.shape or old.num_experts != new.num_experts:
        raise ValueError(
            f"{new.source}: cannot compare with {old.source}: shapes {list(new.phy2log_LP.shape)} "
            f"and {list(old.phy2log_LP.shape)}, {new.num_experts} and {old.num_experts} experts"
        )
    topo = new.topology
    G, N, E = topo.num_gpus, topo.num_nodes, new.num_experts
    experts, intra = np.zeros(new.num_layers, dtype=np.int64), np.zeros(new.num_layers, dtype=np.int64)
    for l in range(new.num_layers):
        old_GE, new_GE = experts_on_gpus(old, l), experts_on_gpus(new, l)
        incoming_GE = new_GE & ~old_GE
        on_node_NE = old_GE.reshape(N, G // N, E).any(axis=1)
        experts[l] = incoming_GE.sum()
        intra[l] = (incoming_GE & np.repeat(on_node_NE, G // N, axis=0)).sum()
    return MoveReport(experts, intra, topo.expert_bytes)


def experts_on_gpus(placement: Placement, l: int) -> np.ndarray:
    """[G, E] bool: GPU g holds a replica of expert e in layer row l."""
    topo = placement.topology
    on_GE = np.zeros((topo.num_gpus, placement.num_experts), dtype=bool)
    on_GE[np.arange(topo.num_slots) // topo.slots_per_gpu, placement.phy2log_LP[l]] = True
    return on_GE


def align(placement: Placement, trace: Trace) -> np.ndarray:
    """Rows of `trace` for the placement's layers; ValueError when they do not describe the same model."""
    if trace.num_experts != placement.num_experts:
        raise ValueError(
            f"{trace.source}: has {trace.num_experts} experts, the placement {placement.source} {placement.num_experts}"
        )
    rows = np.searchsorted(trace.layers, placement.layers)
    rows = np.minimum(rows, trace.num_layers - 1)
    missing = placement.layers[trace.layers[rows] != placement.layers]
    if len(missing):
        raise ValueError(f"{trace.source}: has no counts for layer(s) {missing.tolist()[:5]} of the placement")
    return rows


def evaluate(placement: Placement, trace: Trace, dispatch: Dispatch | DispatchModel = Dispatch.equal) -> TraceScore:
    """Score `placement` on `trace` under a dispatch rule (or a model of it from `dispatch_model`,
    to score several traces without rebuilding SGLang's tables each time)."""
    model = dispatch if isinstance(dispatch, DispatchModel) else dispatch_model(placement, dispatch)
    rows = align(placement, trace)
    counts_WLE = trace.counts_WLE[:, rows]
    total_LE = counts_WLE.sum(axis=0)
    worst = None
    if trace.num_windows > 1:
        worst = np.max([imbalance(gpu_load_LG(placement, c, model.shares_LP)) for c in counts_WLE], axis=0)
    tokens = token_sample(trace, rows)
    return TraceScore(
        name=trace.source,
        dispatch=model.dispatch,
        imbalance_L=imbalance(gpu_load_LG(placement, total_LE, model.shares_LP)),
        imbalance_best_L=best_split(placement, total_LE)[0],
        worst_window_L=worst,
        remote_nodes_L=remote_nodes_L(placement, tokens.topk_ids_TLK, model.shares_LP, model.choice_GLE),
        tokens_from=tokens.source,
        group_span_L=group_span(placement, total_LE, trace.n_group) if trace.n_group > 1 else None,
    )
