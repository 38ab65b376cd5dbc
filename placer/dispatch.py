"""Dispatch rules: how an engine splits a logical expert's tokens over the expert's replicas.

Scores and the solver depend on the rule, so each is modelled as the engine runs it:

- `equal`: every replica takes the same share (vLLM picks a replica by hashing the token index;
  SGLang's `dynamic` dispatch spreads by row index; both are equal on average).
- `split`: the placement's own per-replica shares (`Placement.split_LP`, equal when absent): what
  `moeplace serve` does (runtime/routing.py `assign_slots`: each source rank splits its tokens of an
  expert by the shares, largest-remainder rounding, so the totals follow the shares).
- `sglang-static`: SGLang 0.5.23's default with an all-to-all backend (DeepEP):
  `compute_logical_to_rank_dispatch_physical_map` in `python/sglang/srt/eplb/expert_location.py`
  fixes, per source rank, ONE replica for each logical expert; all of that rank's tokens of the
  expert go there. Modelled in `sglang_static_choice`.

Tokens are assumed spread evenly over the source ranks (DP attention: each rank serves its own
requests), so a replica that R of G ranks dispatch to takes R / G of its expert's load.
Dimension letters: M model layers (SGLang rows), L placed MoE layers, P slots, E experts, G ranks.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import numpy as np

from moeplace.placement import Placement

SGLANG_STATIC_SEED = 42  # the seed SGLang gives random.Random in that function (0.5.23)


class Dispatch(str, enum.Enum):
    equal = "equal"
    split = "split"
    sglang_static = "sglang-static"


class TargetEngine(str, enum.Enum):
    """The engine a placement is for; it decides the default dispatch rule."""

    moeplace = "moeplace"
    sglang = "sglang"
    vllm = "vllm"
    trtllm = "trtllm"


DEFAULT_DISPATCH = {
    TargetEngine.moeplace: Dispatch.split,
    TargetEngine.sglang: Dispatch.sglang_static,
    TargetEngine.vllm: Dispatch.equal,
    TargetEngine.trtllm: Dispatch.equal,
}


@dataclass(frozen=True)
class DispatchModel:
    """How a placement's slots share the load under one rule.

    shares_LP [L, P] float64: share of its expert's tokens each slot takes (sums to 1 per expert).
    choice_GLE [G, L, E] int64: the slot each source rank sends each expert to (sglang-static), else None.
    """

    dispatch: Dispatch
    shares_LP: np.ndarray
    choice_GLE: np.ndarray | None = None


def dispatch_model(placement: Placement, dispatch: Dispatch) -> DispatchModel:
    """The shares (and, for sglang-static, the per-rank tables) of `placement` under `dispatch`."""
    rows = np.arange(placement.num_layers)[:, None]
    if dispatch is Dispatch.split and placement.split_LP is not None:
        return DispatchModel(dispatch, placement.split_LP)
    if dispatch is not Dispatch.sglang_static:
        return DispatchModel(dispatch, 1.0 / placement.replica_count_LE[rows, placement.phy2log_LP])
    rows_MP = sglang_rows(placement)
    topo = placement.topology
    choice_GME = sglang_static_choice(rows_MP, placement.num_experts, topo.num_gpus, topo.gpus_per_node)
    if placement.num_model_layers is not None:
        choice_GME = choice_GME[:, placement.layers]
    G, L, E = choice_GME.shape
    ranks_LP = np.zeros((L, topo.num_slots))
    np.add.at(ranks_LP, (np.broadcast_to(np.arange(L)[None, :, None], choice_GME.shape), choice_GME), 1.0)
    return DispatchModel(dispatch, ranks_LP / G, choice_GME)


def sglang_rows(placement: Placement) -> np.ndarray:
    """[M, P] SGLang's physical_to_logical_map for the placement: one row per model layer, layers the
    placement lacks trivial (p % E), as `moeplace export --format sglang` writes them. Without a model
    layer count, the placed layers alone (SGLang would then see other rows; noted by the caller)."""
    P, E = placement.topology.num_slots, placement.num_experts
    if placement.num_model_layers is None:
        return placement.phy2log_LP
    rows_MP = np.tile(np.arange(P) % E, (placement.num_model_layers, 1))
    rows_MP[placement.layers] = placement.phy2log_LP
    return rows_MP


def sglang_static_choice(phy2log_MP: np.ndarray, num_experts: int, ep_size: int, gpus_per_node: int) -> np.ndarray:
    """[G, M, E] int64: the slot each source rank sends each logical expert to, as SGLang 0.5.23
    builds it at start-up (`--init-expert-location`, `--ep-dispatch-algorithm static`).

    What SGLang does, in our words. Candidates of an expert are its slots in ascending order. A
    rank's "nearest" candidate: the only one if there is one; else the first on its own GPU; else
    the first on its own node if some but not all candidates are on that node; else none. Each rank
    builds its table itself (moe_ep_rank set): where it has a nearest candidate it keeps just that
    one. Where it has none, it takes every rank without a nearest candidate ("remaining", in rank
    order), deals them the candidates fairly (each candidate k // n times, then a random sample
    without repeats of k % n more, the list shuffled) with its OWN `random.Random(42)`, created
    afresh per rank and drawn from only for the (layer, expert) pairs where that rank has no nearest
    candidate, layers and experts in order; the rank takes the entry at its own position.
    The draws use Python's `random` exactly as SGLang calls it (same seed, same calls, same order),
    so the tables agree with SGLang's on CPython 3.11, the version its wheel targets.
    """
    M, P = phy2log_MP.shape
    S = P // ep_size
    node_slots = S * gpus_per_node
    num_nodes = ep_size // gpus_per_node
    choice_GME = np.empty((ep_size, M, num_experts), dtype=np.int64)
    pending = []  # (m, e, candidates, remaining ranks) where some rank has no nearest candidate
    for m in range(M):
        order = np.argsort(phy2log_MP[m], kind="stable")
        starts = np.searchsorted(phy2log_MP[m][order], np.arange(num_experts + 1))
        single = np.diff(starts) == 1  # one candidate: every rank sends there, nothing is drawn
        choice_GME[:, m, single] = order[starts[:-1][single]]
        for e in np.flatnonzero(~single):
            cands = order[starts[e]:starts[e + 1]]
            near_G = _nearest(cands, ep_size, S, node_slots, num_nodes, gpus_per_node)
            choice_GME[:, m, e] = near_G
            if (near_G < 0).any():
                pending.append((m, e, cands.tolist(), np.flatnonzero(near_G < 0)))
    for rank in range(ep_size):
        rng = random.Random(SGLANG_STATIC_SEED)
        for m, e, cands, remaining in pending:
            if choice_GME[rank, m, e] >= 0:
                continue
            dealt = _fair_deal(cands, len(remaining), rng)
            choice_GME[rank, m, e] = dealt[int(np.searchsorted(remaining, rank))]
    return choice_GME


def _nearest(cands: np.ndarray, ep_size: int, S: int, node_slots: int, num_nodes: int, gpus_per_node: int) -> np.ndarray:
    """[G] each rank's nearest candidate slot, -1 for none (rules in `sglang_static_choice`)."""
    if len(cands) == 1:
        return np.full(ep_size, cands[0], dtype=np.int64)
    near_G = np.full(ep_size, -1, dtype=np.int64)
    node_of = cands // node_slots
    on_node_N = np.bincount(node_of, minlength=num_nodes)
    first_on_node_N = np.full(num_nodes, -1, dtype=np.int64)
    for c in cands[::-1]:  # ascending slots: the first on a node is written last
        first_on_node_N[c // node_slots] = c
    narrows_N = (on_node_N > 0) & (on_node_N < len(cands))
    node_G = np.arange(ep_size) // gpus_per_node
    near_G[narrows_N[node_G]] = first_on_node_N[node_G[narrows_N[node_G]]]
    gpu_of = cands // S
    # A rank holding a replica uses it: at most one per GPU in a valid plan, else the first.
    for c, g in zip(cands[::-1], gpu_of[::-1]):
        near_G[g] = c
    return near_G


def _fair_deal(cands: list[int], k: int, rng: random.Random) -> list[int]:
    """k picks from the candidates: each one k // n times plus a random k % n of them, shuffled."""
    rounds, extra = divmod(k, len(cands))
    dealt = cands * rounds + rng.sample(cands, k=extra)
    rng.shuffle(dealt)
    return dealt
