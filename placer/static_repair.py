"""Re-pack a placement for SGLang's static dispatch, with each slot's exact load.

Under `sglang-static` a replica's load is not its expert's load / replicas: it is the share of
source ranks whose table points at it (placer.dispatch), and those tables draw from one random
stream per rank across all layers. The layer search plans with equal shares (spreading an expert's
replicas over distinct nodes, where the expected static share IS the equal share); this pass then
takes the exact shares of the whole placement and swaps slots between GPUs with moves that leave
every rank's table, and so every draw, unchanged:

- a replica moves to another GPU of its node (the ranks that prefer it are those of its node, and
  its place in its expert's slot order is its node's): allowed when no other replica of its expert
  shares that node (then "first on the node" could change);
- an expert with one replica moves anywhere (all ranks send to it; no draw is made for it), when
  that does not change whether it sits on its routing group's home node (the traffic term).

So one simulation gives loads that stay exact through the whole pass. Swaps are taken on the
hottest GPU while they cool it (the pair's new maximum below it), as in placer.cpsat's descent.
Dimension letters: W workloads, P slots, G GPUs, S slots per GPU, E experts.
"""

from __future__ import annotations

import time

import numpy as np

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch, DispatchModel, dispatch_model
from moeplace.placer.evaluate import experts_on_gpus
from moeplace.topology import Topology
from moeplace.trace import Trace


def repair_placement(rows_LGS: np.ndarray, share_WLE: np.ndarray, topology: Topology, trace: Trace, homes,
                   old: Placement | None, deadline: float) -> tuple[np.ndarray, DispatchModel]:
    """Re-pack every layer with the exact per-slot loads of SGLang's static tables (placer.static_repair).
    Returns the rows and the tables, which the re-packing carries along (they stay SGLang's exactly)."""
    L = rows_LGS.shape[0]
    draft = Placement(rows_LGS.reshape(L, -1), trace.num_experts, topology, trace.layers, trace.num_model_layers)
    model = dispatch_model(draft, Dispatch.sglang_static)
    out, shares, where_LP = [], [], []
    for l in range(L):
        phy2log = draft.phy2log_LP[l]
        load_WP = share_WLE[:, l][:, phy2log] * topology.num_gpus * model.shares_LP[l]
        old_GE = None if old is None else experts_on_gpus(old, l)
        layer_deadline = time.monotonic() + max(0.0, deadline - time.monotonic()) / (L - l)
        row, item_P = repack_layer(phy2log, load_WP, topology.gpus_per_node, topology.num_gpus, homes[l], old_GE,
                                   layer_deadline)
        out.append(row)
        shares.append(model.shares_LP[l][item_P])
        where_LP.append(np.argsort(item_P))  # new slot of each old slot
    where_LP = np.stack(where_LP)
    choice_GLE = np.take_along_axis(where_LP[None], model.choice_GLE, axis=2)
    return np.stack(out).reshape(rows_LGS.shape), DispatchModel(Dispatch.sglang_static, np.stack(shares), choice_GLE)


def follow_slots(model: DispatchModel, before_LP: np.ndarray, after_LP: np.ndarray, topology: Topology) -> DispatchModel:
    """The model after each GPU's slots were reordered (an expert sits at most once on a GPU)."""
    L, P = before_LP.shape
    gpu_P = np.arange(P) // topology.slots_per_gpu
    where_LP = np.zeros((L, P), dtype=np.int64)
    for l in range(L):
        slot_of = {(int(g), int(e)): p for p, (g, e) in enumerate(zip(gpu_P, after_LP[l]))}
        where_LP[l] = [slot_of[(int(g), int(e))] for g, e in zip(gpu_P, before_LP[l])]
    shares_LP = np.zeros_like(model.shares_LP)
    np.put_along_axis(shares_LP, where_LP, model.shares_LP, axis=1)
    choice_GLE = np.take_along_axis(where_LP[None], model.choice_GLE, axis=2)
    return DispatchModel(model.dispatch, shares_LP, choice_GLE)


def repack_layer(
    phy2log_P: np.ndarray,
    load_WP: np.ndarray,
    gpus_per_node: int,
    num_gpus: int,
    home_node_E: np.ndarray | None,
    old_on_GE: np.ndarray | None,
    deadline: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_P [P] with the GPUs' contents re-packed, item_P [P]: the old slot whose replica each
    slot now holds, so shares and tables follow their replicas); load_WP [W, P] each slot's exact load.
    old_on_GE [G, E]: the old layout (`solve --from`); swaps then keep the number of moves, so the
    migration choice (placer.migrate) stays what it was."""
    P = len(phy2log_P)
    S = P // num_gpus
    expert_GS = phy2log_P.reshape(num_gpus, S).copy()
    item_GS = np.arange(P).reshape(num_gpus, S)
    load_WGS = load_WP.reshape(-1, num_gpus, S).copy()
    node_G = np.arange(num_gpus) // gpus_per_node
    replicas_E = np.bincount(phy2log_P)
    on_NE = np.zeros((num_gpus // gpus_per_node, len(replicas_E)), dtype=np.int64)
    np.add.at(on_NE, (node_G[np.arange(P) // S], phy2log_P), 1)
    locked_E = (on_NE > 1).any(axis=0)  # two replicas on one node: their order on it matters
    while time.monotonic() < deadline:
        if not _best_swap(expert_GS, item_GS, load_WGS, node_G, replicas_E, locked_E, home_node_E, old_on_GE):
            break
    return expert_GS.reshape(P), item_GS.reshape(P)


def _best_swap(expert_GS, item_GS, load_WGS, node_G, replicas_E, locked_E, home_node_E, old_on_GE) -> bool:
    """Make the swap of a slot of the hottest GPU that cools it most; False when none does."""
    load_WG = load_WGS.sum(axis=2)
    hot_G = load_WG.max(axis=0)
    g = int(np.argmax(hot_G))
    la_WS = load_WGS[:, g]
    # new loads when a[i] (on g) swaps with expert_GS[h, j]: [W, S, G, S]
    new_g = load_WG[:, g, None, None, None] - la_WS[:, :, None, None] + load_WGS[:, None]
    new_h = load_WG[:, None, :, None] + la_WS[:, :, None, None] - load_WGS[:, None]
    pair = np.maximum(new_g.max(axis=0), new_h.max(axis=0))
    allowed = _allowed(g, expert_GS, node_G, replicas_E, locked_E, home_node_E)
    if old_on_GE is not None:
        allowed &= _moved_delta(g, expert_GS, old_on_GE) == 0
    pair = np.where(allowed, pair, np.inf)
    i, h, j = np.unravel_index(np.argmin(pair), pair.shape)
    # Strictly cooler pair; the other GPUs do not change, so the hottest never rises.
    if not pair[i, h, j] < hot_G[g] - 1e-12:
        return False
    a, b = expert_GS[g, i], expert_GS[h, j]
    expert_GS[g, i], expert_GS[h, j] = b, a
    item_GS[g, i], item_GS[h, j] = item_GS[h, j], item_GS[g, i]
    la, lb = load_WGS[:, g, i].copy(), load_WGS[:, h, j].copy()
    load_WGS[:, g, i], load_WGS[:, h, j] = lb, la
    return True


def _allowed(g, expert_GS, node_G, replicas_E, locked_E, home_node_E) -> np.ndarray:
    """[S, G, S]: may slot i of GPU g swap with slot j of GPU h (rules in the module doc)?"""
    G, S = expert_GS.shape
    a_S = expert_GS[g]
    holds_GE = np.zeros((G, len(replicas_E)), dtype=bool)
    holds_GE[np.arange(G)[:, None], expert_GS] = True
    no_dup = ~holds_GE[:, a_S].T[:, :, None] & ~holds_GE[g][expert_GS][None]  # a onto h, b onto g
    same_node = (node_G == node_G[g])[None, :, None]
    movable_a = ~locked_E[a_S]
    movable_b = ~locked_E[expert_GS]
    within = same_node & movable_a[:, None, None] & movable_b[None]
    single_a = replicas_E[a_S] == 1
    single_b = replicas_E[expert_GS] == 1
    across = single_a[:, None, None] & single_b[None]
    if home_node_E is not None:
        # neither expert's "at home" changes: its home is neither of the two nodes
        ng = node_G[g]
        a_keeps = (home_node_E[a_S][:, None] != node_G[None, :]) & (home_node_E[a_S] != ng)[:, None]
        b_keeps = (home_node_E[expert_GS] != node_G[:, None]) & (home_node_E[expert_GS] != ng)
        across &= a_keeps[:, :, None] & b_keeps[None]
    allowed = no_dup & (within | across)
    allowed[:, g, :] = False
    return allowed


def _moved_delta(g: int, expert_GS: np.ndarray, old_on_GE: np.ndarray) -> np.ndarray:
    """[S, G, S] change in (expert, GPU) pairs new relative to the old layout when a[i] (on g) swaps
    with expert_GS[h, j] (on h)."""
    a_S = expert_GS[g]
    new_GE = ~old_on_GE
    b_onto_g = new_GE[g][expert_GS]                       # [G, S]
    a_onto_h = new_GE[:, a_S].T                           # [S, G]
    return (b_onto_g[None].astype(np.int64) - new_GE[g][a_S][:, None, None]
            + a_onto_h[:, :, None] - np.take_along_axis(new_GE, expert_GS, axis=1)[None])
