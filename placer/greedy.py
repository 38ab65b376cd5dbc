"""Greedy placement policies.

1. DeepSeek EPLB's hierarchical and global policies, written fresh from the published algorithm
   (deepseek-ai/EPLB `eplb.py`): pack routing groups to nodes, replicate the hottest experts inside
   each node, pack the physical experts to the node's GPUs. They plan for one load vector (the mean),
   and may put two replicas of an expert on one GPU.
2. A scenario-aware greedy, moeplace's baseline and the CP-SAT solver's warm start: replicas by the
   worst workload, then each replica, heaviest first, onto the GPU where the worst workload's load
   grows least, never two replicas of an expert on one GPU.

Shapes: weight [layers, experts]; phy2log [layers, physical]; load_WE [workloads, experts].
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight_XN: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the N items of each row into num_packs packs of N / num_packs items each.

    weight_XN: [X, N]. Items go heaviest first into the lightest pack that still has room.
    Returns pack_XN (the pack of each item) and rank_XN (its position inside the pack).
    """
    X, N = weight_XN.shape
    assert N % num_packs == 0, f"{N} items do not split into {num_packs} equal packs"
    per_pack = N // num_packs
    if per_pack == 1:
        ids = np.broadcast_to(np.arange(N), (X, N))
        return ids.copy(), np.zeros((X, N), dtype=np.int64)
    pack_XN = np.full((X, N), -1, dtype=np.int64)
    rank_XN = np.full((X, N), -1, dtype=np.int64)
    for x in range(X):
        pack_weight = np.zeros(num_packs)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight_XN[x], kind="stable"):
            open_weight = np.where(pack_items < per_pack, pack_weight, np.inf)
            pack = int(np.argmin(open_weight))
            pack_XN[x, item] = pack
            rank_XN[x, item] = pack_items[pack]
            pack_weight[pack] += weight_XN[x, item]
            pack_items[pack] += 1
    return pack_XN, rank_XN


def replicate_experts(weight_XE: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each of E experts one physical copy, then the remaining num_phy - E copies one at a time
    to the expert with the highest load per copy.

    Returns phy2log_XP [X, num_phy], rank_XP (replica index of each copy), logcnt_XE [X, E].
    """
    X, E = weight_XE.shape
    assert num_phy >= E, f"{num_phy} physical experts cannot hold {E} logical experts"
    phy2log = np.tile(np.arange(num_phy) % E, (X, 1))
    rank = np.zeros((X, num_phy), dtype=np.int64)
    logcnt = np.ones((X, E), dtype=np.int64)
    rows = np.arange(X)
    for p in range(E, num_phy):
        hottest = np.argmax(weight_XE / logcnt, axis=-1)
        phy2log[:, p] = hottest
        rank[:, p] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm_XN: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm_XN)
    np.put_along_axis(inv, perm_XN, np.broadcast_to(np.arange(perm_XN.shape[1]), perm_XN.shape), axis=1)
    return inv


def rebalance_hierarchical(
    weight_LE: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB's hierarchical policy. Returns phy2log [L, num_phy], rank [L, num_phy], logcnt [L, E]."""
    L, E = weight_LE.shape
    assert E % num_groups == 0 and num_groups % num_nodes == 0, (E, num_groups, num_nodes)
    assert num_gpus % num_nodes == 0 and num_phy % num_gpus == 0, (num_gpus, num_nodes, num_phy)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # Step 1: pack groups to nodes; "mlog" numbers experts node by node.
    group_pack, group_rank = balanced_packing(weight_LE.reshape(L, num_groups, group_size).sum(-1), num_nodes)
    group_of_expert = np.arange(E) // group_size
    log2mlog = (group_pack[:, group_of_expert] * groups_per_node + group_rank[:, group_of_expert]) * group_size
    log2mlog += np.arange(E) % group_size
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within each node.
    weight_per_mlog = np.take_along_axis(weight_LE, mlog2log, axis=1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phy_rank, mlog_count = replicate_experts(weight_per_mlog, num_phy // num_nodes)

    # Step 3: pack each node's physical experts to its GPUs.
    weight_per_phy = np.take_along_axis(weight_per_mlog / mlog_count, phy2mlog, axis=1)
    pack, rank_in_pack = balanced_packing(weight_per_phy, gpus_per_node)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, E, E // num_nodes)[None, :, None]).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlog_count.reshape(L, -1), log2mlog, axis=1)
    return phy2log, rank, logcnt


def rebalance_experts(
    weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB's entry point: the hierarchical policy when groups divide over nodes, else the
    global policy (one group, one node).

    Returns phy2log [L, num_replicas], log2phy [L, E, max replicas] (-1 = none), logcnt [L, E].
    """
    weight_LE = np.asarray(weight_LE, dtype=np.float64)
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = rebalance_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
    L, E = weight_LE.shape
    R = int(logcnt.max())
    log2phy = np.full((L, E * R), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * R + rank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1)
    return phy2log, log2phy.reshape(L, E, R), logcnt


def replicate_for_scenarios(load_WE: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """Replica count per expert [E]: start at one each, then give each spare slot to the expert whose
    load per replica is highest in its worst workload (at most max_replicas each, e.g. one per GPU)."""
    W, E = load_WE.shape
    assert num_slots >= E and max_replicas * E >= num_slots, (num_slots, E, max_replicas)
    worst_E = load_WE.max(axis=0)
    replicas_E = np.ones(E, dtype=np.int64)
    for _ in range(num_slots - E):
        per_replica = np.where(replicas_E < max_replicas, worst_E / replicas_E, -np.inf)
        replicas_E[int(np.argmax(per_replica))] += 1
    return replicas_E


def pack_for_scenarios(
    load_WE: np.ndarray,
    replicas_E: np.ndarray,
    num_gpus: int,
    slots_per_gpu: int,
    extra_cost_GE: np.ndarray | None = None,
    spread_nodes: int = 0,
) -> np.ndarray:
    """Place each replica, heaviest (in its worst workload) first, on the GPU with a free slot and no
    copy of that expert where the worst workload's GPU load after adding it is least.

    load_WE: [W, E] workload loads; replicas_E: [E]; extra_cost_GE: optional [G, E] cost added for
    putting a replica of e on g (moving it there, taking it off its home node), in load units.
    spread_nodes: GPUs per node when an expert with at most one replica per node should get none
    twice on a node (SGLang's static dispatch: placer.dispatch); such GPUs are then taken last.
    Returns gpu_experts_GS [G, slots_per_gpu].
    """
    W, E = load_WE.shape
    assert replicas_E.sum() == num_gpus * slots_per_gpu, (replicas_E.sum(), num_gpus, slots_per_gpu)
    assert replicas_E.max() <= num_gpus, "an expert cannot have more replicas than there are GPUs"
    per_replica_WE = load_WE / replicas_E
    experts = np.repeat(np.arange(E), replicas_E)
    order = experts[np.argsort(-per_replica_WE.max(axis=0)[experts], kind="stable")]
    load_WG = np.zeros((W, num_gpus))
    filled_G = np.zeros(num_gpus, dtype=np.int64)
    has_GE = np.zeros((num_gpus, E), dtype=bool)
    gpu_experts = np.full((num_gpus, slots_per_gpu), -1, dtype=np.int64)
    for e in order:
        worst_after = (load_WG + per_replica_WE[:, e : e + 1]).max(axis=0)
        if extra_cost_GE is not None:
            worst_after = worst_after + extra_cost_GE[:, e]
        if spread_nodes and replicas_E[e] <= num_gpus // spread_nodes:
            on_node_G = has_GE[:, e].reshape(-1, spread_nodes).any(axis=1).repeat(spread_nodes)
            worst_after = worst_after + 1e6 * on_node_G  # only when no other GPU has room
        cost = np.where((filled_G < slots_per_gpu) & ~has_GE[:, e], worst_after, np.inf)
        g = int(np.argmin(cost))
        if not np.isfinite(cost[g]):
            g = _make_room(e, gpu_experts, filled_G, has_GE, load_WG, per_replica_WE)
        gpu_experts[g, filled_G[g]] = e
        filled_G[g] += 1
        has_GE[g, e] = True
        load_WG[:, g] += per_replica_WE[:, e]
    return gpu_experts


def _make_room(
    e: int,
    gpu_experts: np.ndarray,
    filled_G: np.ndarray,
    has_GE: np.ndarray,
    load_WG: np.ndarray,
    per_replica_WE: np.ndarray,
) -> int:
    """Every GPU with a free slot already holds e (heavier replicas filled the others first): move
    one expert f from a full GPU g without e to such a GPU h, and return g, which now has room.

    Such an f always exists: g holds S distinct experts, h at most S - 2 besides e."""
    S = gpu_experts.shape[1]
    worst_G = load_WG.max(axis=0)
    free = np.flatnonzero(filled_G < S)
    without = np.flatnonzero(~has_GE[:, e])
    assert len(free) and len(without), f"no GPU can take a replica of expert {e}"
    h = int(free[np.argmin(worst_G[free])])
    g = int(without[np.argmin(worst_G[without])])
    i = next(i for i, f in enumerate(gpu_experts[g]) if not has_GE[h, f])
    f = gpu_experts[g, i]
    gpu_experts[h, filled_G[h]] = f
    filled_G[h] += 1
    has_GE[h, f], has_GE[g, f] = True, False
    load_WG[:, h] += per_replica_WE[:, f]
    load_WG[:, g] -= per_replica_WE[:, f]
    filled_G[g] -= 1
    gpu_experts[g, i] = gpu_experts[g, filled_G[g]]
    gpu_experts[g, filled_G[g]] = -1
    return g
