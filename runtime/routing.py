"""Routing: tokens -> logical experts (DeepSeek-V3's gate) -> physical slots (the placement).

Legend: T tokens, K top-k, E logical experts, G routing groups, R replicas (max per expert),
A = T*K (token, k) assignments in row-major (token) order, N nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeplace.placement import Placement


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
        biased_TE = biased_TE.masked_fill(~kept_TG.repeat_interleave(per_group, dim=1), float("-inf"))
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
    padding); slots_per_rank; ranks_per_node; num_nodes.
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
        log2phy = placement.log2phy_LER[row]
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


def assign_slots(topk_ids_TK: torch.Tensor, table: SlotTable, rank: int) -> torch.Tensor:
    """Logical experts -> physical slots for the tokens of source rank `rank`: slot_ids_TK int64.

    Deterministic rule, for each expert e with replicas r = 0..n-1 (placement order):
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
    """
    T, K = topk_ids_TK.shape
    E, R = table.log2phy_ER.shape
    device = topk_ids_TK.device
    e_A = topk_ids_TK.reshape(-1)
    t_A = torch.arange(T, device=device).repeat_interleave(K)
    valid_ER = table.log2phy_ER >= 0
    # 1. quotas
    tokens_E = torch.bincount(e_A, minlength=E)
    quota_ER = _quotas(tokens_E, table.share_ER, valid_ER, rank)
    # 2. visited nodes
    visited_TN = torch.zeros(T, table.num_nodes, dtype=torch.bool, device=device)
    visited_TN[:, rank // table.ranks_per_node] = True
    single_A = valid_ER.sum(dim=1)[e_A] == 1
    visited_TN[t_A[single_A], table.node_ER[e_A[single_A], 0]] = True
    # 3. preferred replicas, while quota lasts
    node_AR = table.node_ER[e_A]
    prefer_AR = (node_AR >= 0) & visited_TN[t_A[:, None], node_AR.clamp(min=0)]
    pref_A = prefer_AR.int().argmax(dim=1)
    want_A = prefer_AR.any(dim=1)
    taken_A = torch.zeros_like(want_A)
    taken_A[want_A] = _occurrence(e_A[want_A] * R + pref_A[want_A]) < quota_ER[e_A[want_A], pref_A[want_A]]
    # 4. the rest fill the remaining quotas in replica order
    used_ER = torch.zeros_like(quota_ER)
    used_ER.index_put_((e_A[taken_A], pref_A[taken_A]), torch.ones_like(e_A[taken_A]), accumulate=True)
    fill_ER = (quota_ER - used_ER).cumsum(dim=1)
    rest_A = ~taken_A
    nth = _occurrence(e_A[rest_A])
    replica_A = pref_A.clone()
    replica_A[rest_A] = (nth[:, None] >= fill_ER[e_A[rest_A]]).sum(dim=1)
    slot_A = table.log2phy_ER[e_A, replica_A]
    assert bool((slot_A >= 0).all()), "an assignment fell on a padding replica"
    return slot_A.view(T, K)


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
