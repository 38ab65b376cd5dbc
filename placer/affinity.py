"""Home nodes for the traffic term: where each expert should live so tokens stay on few nodes.

Two sources, in order of preference:
- sampled per-token top-k (a trace's topk_ids): experts often chosen together by one token are put
  in one part of a balanced partition (one part per node), so a token's experts share a node;
- the model's group-limited routing (DeepSeek-V3: 8 groups, a token uses 4): whole groups go to
  nodes, heaviest first onto the least loaded node, as EPLB's hierarchical step 1 does.
"""

from __future__ import annotations

import numpy as np


def group_homes(share_WE: np.ndarray, group_E: np.ndarray, num_nodes: int) -> np.ndarray:
    """[E] home node: groups packed onto nodes by their worst-workload load, ceil(groups/nodes) each."""
    load_J = np.bincount(group_E, weights=share_WE.max(axis=0))
    room = -(-len(load_J) // num_nodes)
    node_load, node_groups = np.zeros(num_nodes), np.zeros(num_nodes, dtype=np.int64)
    home_J = np.empty(len(load_J), dtype=np.int64)
    for j in np.argsort(-load_J, kind="stable"):
        n = int(np.argmin(np.where(node_groups < room, node_load, np.inf)))
        home_J[j] = n
        node_load[n] += load_J[j]
        node_groups[n] += 1
    return home_J[group_E]


def coactivation(topk_ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] tokens that chose both experts (zero diagonal). topk_ids_TK: [T, K], -1 = no choice."""
    T, K = topk_ids_TK.shape
    chosen_TE = np.zeros((T, num_experts + 1), dtype=np.float64)
    chosen_TE[np.arange(T)[:, None], np.where(topk_ids_TK >= 0, topk_ids_TK, num_experts)] = 1.0
    together = chosen_TE[:, :num_experts].T @ chosen_TE[:, :num_experts]
    np.fill_diagonal(together, 0.0)
    return together


def coactivation_homes(together_EE: np.ndarray, load_E: np.ndarray, num_nodes: int) -> np.ndarray:
    """[E] home node: a balanced partition (ceil(E/nodes) experts per part) that keeps experts chosen
    together in one part. Greedy growth, heaviest expert first, then improving swaps."""
    E = len(load_E)
    room = -(-E // num_nodes)
    part_E = np.full(E, -1)
    affinity_EN = np.zeros((E, num_nodes))  # co-activation of each expert with each part's members
    part_load, part_size = np.zeros(num_nodes), np.zeros(num_nodes, dtype=np.int64)
    for e in np.argsort(-load_E, kind="stable"):
        # most affinity first, then the lighter part (each node must also carry a fair share of load)
        score = np.where(part_size < room, affinity_EN[e] - 1e-9 * part_load, -np.inf)
        n = int(np.argmax(score))
        part_E[e] = n
        part_size[n] += 1
        part_load[n] += load_E[e]
        affinity_EN[:, n] += together_EE[:, e]
    for _ in range(E):
        own = affinity_EN[np.arange(E), part_E]
        # gain of swapping e and f across their parts
        gain = (affinity_EN[:, part_E] - own[:, None]) + (affinity_EN[:, part_E].T - own[None, :]) - 2 * together_EE
        gain[part_E[:, None] == part_E[None, :]] = -np.inf
        e, f = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[e, f] <= 1e-9:
            break
        pe, pf = part_E[e], part_E[f]
        part_E[e], part_E[f] = pf, pe
        affinity_EN[:, pe] += together_EE[:, f] - together_EE[:, e]
        affinity_EN[:, pf] += together_EE[:, e] - together_EE[:, f]
    return part_E
