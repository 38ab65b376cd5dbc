"""Routing: tokens -> logical experts (DeepSeek-V3's gate) -> physical slots (the placement).

Legend: T tokens, K top-k, E logical experts, G routing groups, R replicas (max per expert),
A = T*K (token, k) assignments in row-major (token) order, N nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moeplace.placement import Placement
from moeplace.runtime.slots import copy_in


@dataclass(frozen=True, slots=True)
class RouterConfig:
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_model(cls, config) -> RouterConfig:
        return cls(config.num_experts_per_tok, config.n_group, config.topk_group,
                   config.norm_topk_prob, config.routed_scaling_factor)


def select_experts(
    router_logits_TE: torch.Tensor, bias_E: torch.Tensor, cfg: RouterConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 gate: -> (topk_ids_TK int64 logical experts, topk_weights_TK float32).

    Scores are sigmoid(logits); the correction bias is added for *selection only*. Groups are ranked
    by the sum of their two best biased scores, the best `topk_group` groups kept, and the top-k
    experts taken among them. Weights are the unbiased scores of the chosen experts, renormalised to
    sum 1 when `norm_topk_prob`, times `routed_scaling_factor`.
    """
    T, E = router_logits_TE.shape
    scores_TE = router_logits_TE.float().sigmoid()
    biased_TE = scores_TE + bias_E.float()
    if cfg.n_group > 1:
        per_group = E // cfg.n_group
        group_score_TG = biased_TE.view(T, cfg.n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
        kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        kept_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1).indices, True)
        # expand, not repeat_interleave: no host sync
        kept_TE = kept_TG[:, :, None].expand(T, cfg.n_group, per_group).reshape(T, E)
        biased_TE = biased_TE.masked_fill(~kept_TE, float("-inf"))
    topk_ids_TK = biased_TE.topk(cfg.top_k, dim=-1).indices
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.norm_topk_prob:
        topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_ids_TK, topk_weights_TK * cfg.routed_scaling_factor


@dataclass(frozen=True)
class SlotTable:
    """One MoE layer of a placement, as device tensors for `assign_slots`.

    log2phy_ER int64 global slot of each replica (-1 = none); node_ER int64 its node (-1 = none);
    share_ER float64 share of the expert's tokens each replica takes (sums to 1 per expert, 0 on
    padding); slots_per_rank; ranks_per_node; num_nodes. R is padded to `max_replicas(topology, E)`,
    the most replicas any placement of the topology can give one expert, so every placement of a
    deployment has tables of one shape: a reshard copies the new one into the old one's tensors
    (`copy_from`) and a CUDA graph that captured them stays valid.
    """

    log2phy_ER: torch.Tensor
    node_ER: torch.Tensor
    share_ER: torch.Tensor
    slots_per_rank: int
    ranks_per_node: int
    num_nodes: int

    @classmethod
    def from_placement(cls, placement: Placement, row: int, device: torch.device) -> SlotTable:
        topo = placement.topology
        R = max_replicas(topo.num_slots, placement.num_experts)
        log2phy = np.full((placement.num_experts, R), -1, dtype=np.int64)
        held = placement.log2phy_LER[row]
        assert held.shape[1] <= R, f"an expert has {held.shape[1]} replicas, more than the {R} slots allow"
        log2phy[:, : held.shape[1]] = held
        valid = log2phy >= 0
        node = np.where(valid, log2phy // topo.slots_per_gpu // topo.gpus_per_node, -1)
        if placement.split_LP is None:
            share = valid / valid.sum(axis=1, keepdims=True)
        else:
            share = np.where(valid, placement.split_LP[row][np.maximum(log2phy, 0)], 0.0)
            share = share / share.sum(axis=1, keepdims=True)  # exact 1 per expert: quotas then add up
        as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        return cls(as_tensor(log2phy, torch.int64), as_tensor(node, torch.int64), as_tensor(share, torch.float64),
                   topo.slots_per_gpu, topo.gpus_per_node, topo.num_nodes)

    def copy_from(self, other: SlotTable) -> None:
        """Take `other`'s layout (on any device; the host's without a sync: `copy_in`) in place (same
        topology): tensors captured by a CUDA graph stay valid."""
        same = (other.slots_per_rank, other.ranks_per_node, other.num_nodes) == \
            (self.slots_per_rank, self.ranks_per_node, self.num_nodes)
        assert same and other.log2phy_ER.shape == self.log2phy_ER.shape, "copy_from needs the same topology"
        for name in ("log2phy_ER", "node_ER", "share_ER"):
            copy_in(getattr(self, name), getattr(other, name))


def max_replicas(num_slots: int, num_experts: int) -> int:
    """Most replicas one expert can have when every expert has at least one: P - E + 1."""
    return num_slots - num_experts + 1


def assign_slots(topk_ids_TK: torch.Tensor, table: SlotTable, rank: int,
                 live_T: torch.Tensor | None = None) -> torch.Tensor:
    """Logical experts -> physical slots for the tokens of source rank `rank`: slot_ids_TK int64.

    live_T bool [T] (default all): tokens to route; the others (a fixed-capacity batch's padding) get
    slot -1 and take no quota. Static shapes, no host sync, no boolean-mask indexing: capturable in a
    CUDA graph. Deterministic rule, for each expert e with replicas r = 0..n-1 (placement order):
    1. Quotas: the rank's c tokens of e are split by the replicas' shares (equal split unless the
       placement has `split`): replica r gets floor(share_r * c), and the leftover tokens go one each
       to the replicas with the largest fractional parts, ties to the replica (r - rank) mod n first
       (so the ranks' leftovers land on different replicas).
    2. Visited nodes of a token: this rank's node, and the nodes of its experts that have one replica.
    3. In token order, an assignment whose expert has a replica on a visited node (the first such r)
       takes it while that replica's quota lasts.
    4. The remaining assignments of e, in token order, fill the replicas' remaining quotas in
       replica order.
    Each replica thus gets exactly its quota: the split is balanced whatever the node preferences.
    `assign_slots_ref` is the same rule, one assignment at a time.
    """
    T, K = topk_ids_TK.shape
    E, R = table.log2phy_ER.shape
    device = topk_ids_TK.device
    e_A = topk_ids_TK.reshape(-1)
    t_A = torch.arange(T * K, device=device) // K
    live_A = torch.ones_like(e_A, dtype=torch.bool) if live_T is None else live_T[t_A]
    valid_ER = table.log2phy_ER >= 0
    # 1. quotas
    tokens_E = torch.zeros(E, dtype=torch.int64, device=device).index_add_(0, e_A, live_A.long())
    quota_ER = _quotas(tokens_E, table.share_ER, valid_ER, rank)
    # 2. visited nodes; column N (one past the last node) absorbs the writes of assignments that visit none
    N = table.num_nodes
    visited_TN = torch.zeros(T, N + 1, dtype=torch.bool, device=device)
    visited_TN[:, rank // table.ranks_per_node].fill_(True)
    single_A = live_A & (valid_ER.sum(dim=1)[e_A] == 1)
    # a device tensor of values, not `= True`: a Python scalar would be copied from the host in a graph
    visited_TN.index_put_((t_A, torch.where(single_A, table.node_ER[e_A, 0], N)), torch.ones_like(single_A))
    # 3. preferred replicas, while quota lasts; occurrences counted among the wanting assignments only
    node_AR = table.node_ER[e_A]
    prefer_AR = (node_AR >= 0) & visited_TN[t_A[:, None], node_AR.clamp(min=0)]
    pref_A = prefer_AR.int().argmax(dim=1)
    want_A = live_A & prefer_AR.any(dim=1)
    key_A = e_A * R + pref_A
    taken_A = want_A & (_occurrence(torch.where(want_A, key_A, E * R)) < quota_ER.view(-1)[key_A])
    # 4. the rest fill the remaining quotas in replica order
    used_ER = torch.zeros_like(quota_ER).view(-1).index_add_(0, key_A, taken_A.long()).view(E, R)
    fill_ER = (quota_ER - used_ER).cumsum(dim=1)
    rest_A = live_A & ~taken_A
    nth_A = _occurrence(torch.where(rest_A, e_A, E))
    replica_A = torch.where(rest_A, (nth_A[:, None] >= fill_ER[e_A]).sum(dim=1), pref_A)
    slot_A = torch.where(live_A, table.log2phy_ER[e_A, replica_A.clamp(max=R - 1)], -1)
    return slot_A.view(T, K)


def assign_slots_ref(topk_ids_TK: torch.Tensor, table: SlotTable, rank: int,
                     live_T: torch.Tensor | None = None) -> torch.Tensor:
    """`assign_slots`'s rule in plain Python, one assignment at a time (the test's specification)."""
    T, K = topk_ids_TK.shape
    ids = topk_ids_TK.tolist()
    live = [True] * T if live_T is None else live_T.tolist()
    log2phy, node, share = table.log2phy_ER.tolist(), table.node_ER.tolist(), table.share_ER.tolist()
    replicas = {e: [r for r, p in enumerate(row) if p >= 0] for e, row in enumerate(log2phy)}
    tokens = [0] * len(log2phy)
    for t in range(T):
        for e in ids[t] if live[t] else ():
            tokens[e] += 1
    quota = {e: _quota_ref(tokens[e], [share[e][r] for r in rs], rank) for e, rs in replicas.items()}
    out = [[-1] * K for _ in range(T)]
    for t in range(T):  # 2.-3. visited nodes, preferred replicas while their quota lasts
        if not live[t]:
            continue
        visited = {rank // table.ranks_per_node} | {node[e][0] for e in ids[t] if len(replicas[e]) == 1}
        for k, e in enumerate(ids[t]):
            pref = next((i for i, r in enumerate(replicas[e]) if node[e][r] in visited), None)
            if pref is not None and quota[e][pref] > 0:
                quota[e][pref] -= 1
                out[t][k] = log2phy[e][replicas[e][pref]]
    for t in range(T):  # 4. the rest, in token order, replica by replica
        for k, e in enumerate(ids[t]):
            if live[t] and out[t][k] < 0:
                i = next(i for i, q in enumerate(quota[e]) if q > 0)
                quota[e][i] -= 1
                out[t][k] = log2phy[e][replicas[e][i]]
    return torch.tensor(out, dtype=torch.int64).view(T, K)


def _quota_ref(count: int, shares: list[float], rank: int) -> list[int]:
    n = len(shares)
    exact = [s * count for s in shares]
    base = [math.floor(x) for x in exact]
    by_fraction = sorted(range(n), key=lambda r: (-(exact[r] - base[r]), (r - rank) % n))
    for r in by_fraction[: max(count - sum(base), 0)]:
        base[r] += 1
    return base


def _quotas(tokens_E: torch.Tensor, share_ER: torch.Tensor, valid_ER: torch.Tensor, rank: int) -> torch.Tensor:
    """[E, R] int64 tokens per replica: largest-remainder rounding of share * tokens (step 1 above)."""
    exact_ER = share_ER * tokens_E[:, None].double()
    base_ER = exact_ER.floor()
    frac_ER = torch.where(valid_ER, exact_ER - base_ER, torch.full_like(exact_ER, -1.0))
    leftover_E = (tokens_E - base_ER.sum(dim=1).long()).clamp(min=0)
    n_E = valid_ER.sum(dim=1, keepdim=True)
    r_ER = torch.arange(share_ER.shape[1], device=share_ER.device).expand_as(share_ER)
    tie_ER = torch.where(valid_ER, (r_ER - rank) % n_E, r_ER + share_ER.shape[1])
    # Sort by fraction (descending) then tie order: a stable sort on the tie key, then on the fraction.
    order_ER = torch.argsort(tie_ER, dim=1, stable=True)
    order_ER = order_ER.gather(1, torch.argsort(-frac_ER.gather(1, order_ER), dim=1, stable=True))
    position_ER = torch.empty_like(order_ER).scatter_(1, order_ER, r_ER.contiguous())
    return base_ER.long() + (position_ER < leftover_E[:, None]).long()


def _occurrence(key_A: torch.Tensor) -> torch.Tensor:
    """[A] how many earlier entries of key_A hold the same key (0 for the first of each key)."""
    order = torch.argsort(key_A, stable=True)
    sorted_key = key_A[order]
    first = torch.searchsorted(sorted_key, sorted_key, right=False)
    occurrence = torch.empty_like(key_A)
    occurrence[order] = torch.arange(len(key_A), device=key_A.device) - first
    return occurrence
