"""Routing: the gate against an independent loop implementation of DeepSeek-V3's formula, and the
logical -> physical slot rule (balanced split, node preference, determinism)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeplace.placement import Placement, trivial_placement
from moeplace.runtime.routing import RouterConfig, SlotTable, assign_slots, assign_slots_ref, select_experts
from moeplace.topology import Topology

CPU = torch.device("cpu")


def gate_by_the_formula(logits, bias, cfg: RouterConfig):
    """DeepSeek-V3's gate, one token at a time in plain Python floats: {expert: weight} per token."""
    out = []
    E = len(bias)
    per = E // cfg.n_group
    for row in logits.tolist():
        score = [1 / (1 + math.exp(-v)) for v in row]
        biased = [score[e] + float(bias[e]) for e in range(E)]
        group_score = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(cfg.n_group)]
        groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)] if cfg.n_group > 1 else range(E)
        chosen = sorted(allowed, key=lambda e: -biased[e])[: cfg.top_k]
        total = sum(score[e] for e in chosen) if cfg.norm_topk_prob else 1.0
        out.append({e: score[e] / total * cfg.routed_scaling_factor for e in chosen})
    return out


@pytest.mark.parametrize(
    "cfg, E",
    [
        (RouterConfig(8, 8, 4, True, 2.5), 64),  # the tiny model (DeepSeek-V3's shape scaled down)
        (RouterConfig(8, 8, 4, True, 2.5), 256),  # DeepSeek-V3
        (RouterConfig(4, 1, 1, False, 1.0), 16),  # no groups, no renormalisation
        (RouterConfig(6, 4, 2, True, 1.5), 32),
    ],
)
def test_gate_matches_the_formula(cfg, E):
    gen = torch.Generator().manual_seed(E + cfg.top_k)
    logits = torch.randn(200, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.3
    ids, weights = select_experts(logits, bias, cfg)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (200, cfg.top_k)
    for t, expected in enumerate(gate_by_the_formula(logits, bias, cfg)):
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert got.keys() == expected.keys(), f"token {t}"
        assert got == pytest.approx(expected, rel=1e-5)


def test_bias_selects_but_does_not_weigh():
    cfg = RouterConfig(2, 1, 1, True, 1.0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids, weights = select_experts(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), cfg)
    assert sorted(ids[0].tolist()) == [0, 3]
    s0, s3 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    assert dict(zip(ids[0].tolist(), weights[0].tolist())) == pytest.approx({0: s0 / (s0 + s3), 3: s3 / (s0 + s3)})


def placement_with_replicas(seed: int, gpus=4, per_node=2, slots=20, E=64, split=False) -> Placement:
    rng = np.random.default_rng(seed)
    phy2log = rng.permutation(np.concatenate([np.arange(E), rng.choice(E, gpus * slots - E)]))
    split_LP = None
    if split:
        counts = np.bincount(phy2log, minlength=E)
        raw = rng.uniform(0.2, 1.0, len(phy2log))
        split_LP = (raw / np.bincount(phy2log, weights=raw, minlength=E)[phy2log])[None]
        assert (counts > 0).all()
    return Placement(phy2log[None], E, Topology(gpus, per_node, slots), np.array([1]), split_LP=split_LP)


def random_ids(T, E=64, K=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()


def test_no_replicas_maps_each_expert_to_its_slot():
    placement = trivial_placement(64, Topology(4, 2, 16), np.array([1]))
    ids = random_ids(50)
    slots = assign_slots(ids, SlotTable.from_placement(placement, 0, CPU), rank=3)
    assert torch.equal(slots, ids)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("rank", [0, 3])
def test_replicas_share_each_experts_tokens_by_their_split(split, rank):
    placement = placement_with_replicas(seed=rank, split=split)
    ids = random_ids(300, seed=rank)
    slots = assign_slots(ids, SlotTable.from_placement(placement, 0, CPU), rank)
    assert slots.dtype == torch.int64 and slots.shape == ids.shape
    assert (placement.phy2log_LP[0][slots.numpy()] == ids.numpy()).all()  # every slot holds the chosen expert
    per_slot = np.bincount(slots.reshape(-1).numpy(), minlength=placement.topology.num_slots)
    tokens = np.bincount(ids.reshape(-1).numpy(), minlength=64)
    share = placement.split_LP[0] if split else 1 / placement.replica_count_LE[0][placement.phy2log_LP[0]]
    exact = share * tokens[placement.phy2log_LP[0]]
    assert (np.abs(per_slot - exact) < 1).all()  # largest-remainder rounding of the split


def test_prefers_replicas_on_nodes_the_token_already_visits():
    # 3 nodes of 1 GPU with 3 slots. Expert 0 has replicas on node 1 (slot 3) and node 2 (slot 6).
    phy2log = np.array([1, 2, 3, 0, 4, 5, 0, 6, 7])
    placement = Placement(phy2log[None], 8, Topology(3, 1, 3), np.array([1]))
    table = SlotTable.from_placement(placement, 0, CPU)
    # Tokens 0-3 also go to expert 6 (node 2 only), tokens 4-7 to expert 4 (node 1 only).
    ids = torch.tensor([[0, 6]] * 4 + [[0, 4]] * 4)
    slots = assign_slots(ids, table, rank=0)
    assert slots[:, 0].tolist() == [6] * 4 + [3] * 4
    # From rank 1 (node 1) the home node is visited too: tokens 0-3 could take either, 4-7 want node 1.
    # Quotas stay 4/4: the first four (in token order) fill node 1's quota, the rest go to node 2.
    slots = assign_slots(ids, table, rank=1)
    assert slots[:, 0].tolist() == [3] * 4 + [6] * 4


def test_leftover_tokens_rotate_with_the_source_rank():
    phy2log = np.array([0, 1, 0, 1])  # experts 0 and 1, one replica on each of 2 GPUs (one node)
    placement = Placement(phy2log[None], 2, Topology(2, 2, 2), np.array([1]))
    table = SlotTable.from_placement(placement, 0, CPU)
    ids = torch.tensor([[0], [0], [0]])  # 3 tokens: 2 replicas get 2 and 1
    per_rank = [np.bincount(assign_slots(ids, table, r).reshape(-1).numpy(), minlength=4) for r in (0, 1)]
    assert sorted(per_rank[0][[0, 2]]) == [1, 2] and sorted(per_rank[1][[0, 2]]) == [1, 2]
    assert (per_rank[0] + per_rank[1])[[0, 2]].tolist() == [3, 3]  # balanced over both ranks


def test_deterministic_and_empty():
    placement = placement_with_replicas(seed=5)
    table = SlotTable.from_placement(placement, 0, CPU)
    ids = random_ids(100, seed=5)
    assert torch.equal(assign_slots(ids, table, 2), assign_slots(ids.clone(), table, 2))
    assert assign_slots(ids[:0], table, 0).shape == (0, 8)
    cfg = RouterConfig(8, 8, 4, True, 2.5)
    empty_ids, empty_w = select_experts(torch.zeros(0, 64), torch.zeros(64), cfg)
    assert empty_ids.shape == empty_w.shape == (0, 8)


@pytest.mark.parametrize("seed", range(8))
def test_device_rule_equals_the_one_at_a_time_reference(seed):
    """Random placements with replicas (1-3 nodes, with and without split), source ranks, batch sizes
    (0 included) and padding masks: the static-shape rule gives exactly the reference's slots."""
    rng = np.random.default_rng(seed)
    gpus, per_node = [(4, 2), (4, 1), (6, 3), (2, 2), (6, 2), (4, 4), (3, 1), (2, 1)][seed]
    slots = -(-64 // gpus) + int(rng.integers(1, 8))
    placement = placement_with_replicas(seed, gpus, per_node, slots, split=bool(seed % 2))
    table = SlotTable.from_placement(placement, 0, CPU)
    for rank in range(gpus):
        T = int(rng.choice([0, 1, 7, 130]))
        ids = random_ids(T, seed=seed * 10 + rank)
        live = torch.from_numpy(rng.random(T) < 0.8) if rank % 2 else None
        got = assign_slots(ids, table, rank, live)
        assert torch.equal(got, assign_slots_ref(ids, table, rank, live)), f"rank {rank}, {T} tokens"


def test_padding_takes_no_quota():
    placement = placement_with_replicas(seed=3)
    table = SlotTable.from_placement(placement, 0, CPU)
    ids = random_ids(120, seed=3)
    live = torch.rand(120, generator=torch.Generator().manual_seed(3)) < 0.6
    slots = assign_slots(ids, table, 1, live)
    assert (slots[~live] == -1).all()
    assert torch.equal(slots[live], assign_slots(ids[live], table, 1))  # as if the padding were not there


def test_tables_of_one_topology_have_one_shape_and_copy_in_place():
    a, b = (SlotTable.from_placement(placement_with_replicas(seed=s, split=s == 2), 0, CPU) for s in (1, 2))
    assert a.log2phy_ER.shape == b.log2phy_ER.shape == (64, 4 * 20 - 64 + 1)
    held = a.log2phy_ER
    ids = random_ids(50, seed=4)
    a.copy_from(b)
    assert a.log2phy_ER is held and torch.equal(assign_slots(ids, a, 2), assign_slots(ids, b, 2))
