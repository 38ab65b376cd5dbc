"""ReshardPlan: the simulated plan reaches the new layout moving exactly moves()'s minimum, on random
placements with replicas over several nodes; hand-checked cases; source preference; accounting."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace.placement import Placement
from moeplace.placer.evaluate import experts_on_gpus, moves
from moeplace.runtime.reshard_plan import Link, apply_plan, plan_reshard
from moeplace.topology import Topology

L_, I_, N_, F_ = Link.LOCAL, Link.INTRA_NODE, Link.INTER_NODE, Link.LOCAL_FROM_RECEIVED


def placement(rows, topo: Topology, num_experts: int, source: str = "placement") -> Placement:
    rows = np.array(rows)
    return Placement(rows, num_experts, topo, np.arange(len(rows)) + 3, source=source)


def transfers(plan, l: int) -> list[tuple[int, int, int, Link]]:
    x = plan.layer_X == l
    columns = (plan.src_slot_X, plan.dst_slot_X, plan.expert_X, plan.kind_X)
    return [(s, d, e, Link(k)) for s, d, e, k in zip(*(a[x].tolist() for a in columns))]


def random_layout(rng: np.random.Generator, L: int, E: int, P: int) -> np.ndarray:
    """[L, P]: every expert once, the other slots random replicas (duplicates on a GPU included)."""
    return np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, P - E)])) for _ in range(L)])


@st.composite
def placement_pairs(draw):
    nodes, per_node, S = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    topo = Topology(num_gpus=nodes * per_node, gpus_per_node=per_node, slots_per_gpu=S, expert_bytes=1000)
    E = draw(st.integers(1, topo.num_slots))
    L, rng = draw(st.integers(1, 3)), np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = random_layout(rng, L, E, topo.num_slots)
    # Half the time an edit of the old layout (a few slots re-drawn), the realistic incremental case.
    new = random_layout(rng, L, E, topo.num_slots)
    if draw(st.booleans()):
        keep = rng.random(old.shape) < 0.7
        new = np.where(keep, old, new)
        fresh = random_layout(rng, L, E, topo.num_slots)  # for rows the edit left without some expert
        new = np.stack([row if (np.bincount(row, minlength=E) > 0).all() else f for row, f in zip(new, fresh)])
    return placement(old, topo, E, "old.json"), placement(new, topo, E, "new.json")


@settings(max_examples=150, deadline=None)
@given(pair=placement_pairs())
def test_random_plans_reach_the_new_layout_moving_the_minimum(pair):
    old, new = pair
    plan = plan_reshard(old, new)
    np.testing.assert_array_equal(apply_plan(old.phy2log_LP, plan), new.phy2log_LP)
    report = moves(old, new)
    np.testing.assert_array_equal(plan.experts_moved_L, report.experts_L)
    np.testing.assert_array_equal(plan.moved_LK[:, Link.INTRA_NODE], report.intra_node_L)
    per_node, S = old.topology.gpus_per_node, old.topology.slots_per_gpu
    for l in range(old.num_layers):
        # Remote GPUs receive exactly the (expert, GPU) pairs they lack, each once.
        x = (plan.layer_X == l) & np.isin(plan.kind_X, [I_, N_])
        received = set(zip((plan.dst_slot_X[x] // S).tolist(), plan.expert_X[x].tolist()))
        lacking = experts_on_gpus(new, l) & ~experts_on_gpus(old, l)
        assert received == set(zip(*np.nonzero(lacking))) and len(received) == x.sum()
        # Same node whenever the receiving node held the expert.
        on_node = experts_on_gpus(old, l).reshape(old.topology.num_nodes, per_node, -1).any(axis=1)
        dst_node = plan.dst_slot_X[x] // S // per_node
        assert ((plan.kind_X[x] == I_) == on_node[dst_node, plan.expert_X[x]]).all()
    summary = plan.summary()
    assert summary["experts_moved"] == summary["min_moves"] == report.experts
    assert summary["bytes_moved"] == report.bytes


def test_identical_placement_moves_nothing():
    topo = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=3)
    p = placement(random_layout(np.random.default_rng(0), 2, 9, 12), topo, 9)
    plan = plan_reshard(p, p)
    assert len(plan.layer_X) == 0 and plan.experts_moved_L.tolist() == [0, 0]
    assert plan.estimated_seconds_L().tolist() == [0.0, 0.0] and plan.summary()["staging_bytes_per_rank"] == 0


def test_permutation_within_each_gpu_is_only_local_copies():
    rng = np.random.default_rng(1)
    topo = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=4)
    old = random_layout(rng, 2, 10, 16)
    new = np.stack([np.concatenate([rng.permutation(gpu) for gpu in row.reshape(4, 4)]) for row in old])
    plan = plan_reshard(placement(old, topo, 10), placement(new, topo, 10))
    assert set(plan.kind_X.tolist()) == {L_}
    assert len(plan.kind_X) == (old != new).sum() > 0  # only the slots whose expert changes
    np.testing.assert_array_equal(apply_plan(old, plan), new)


TOPO_2x2x2 = Topology(
    num_gpus=4, gpus_per_node=2, slots_per_gpu=2, expert_bytes=10**9, nvlink_gbps=200.0, network_gbps=50.0
)


def test_hand_checked_plan_with_overwritten_sources():
    # GPUs 0,1 on node 0; GPUs 2,3 on node 1; slots 2g, 2g+1 on GPU g.
    old = [[0, 1, 2, 3, 4, 5, 0, 1]] * 2
    new = [
        [1, 0, 2, 4, 4, 5, 3, 1],  # GPU 0 swaps its slots; GPU 1 gets 4 (node 1 only); GPU 3 gets 3 (node 0 only)
        [0, 1, 2, 0, 4, 5, 3, 1],  # GPU 1 gets 0 from GPU 0 over NVLink; GPU 3 gets 3 from slot 3, which takes 0
    ]
    plan = plan_reshard(placement(old, TOPO_2x2x2, 6), placement(new, TOPO_2x2x2, 6))
    assert transfers(plan, 0) == [(1, 0, 1, L_), (0, 1, 0, L_), (4, 3, 4, N_), (3, 6, 3, N_)]
    assert transfers(plan, 1) == [(0, 3, 0, I_), (3, 6, 3, N_)]
    np.testing.assert_array_equal(apply_plan(np.array(old), plan), new)
    # Both slots of GPU 0 and slot 3 are read before they are overwritten: the staging contract.
    assert plan.staging_slots_LG.tolist() == [[2, 1, 0, 1], [0, 1, 0, 1]]
    assert plan.moved_LK.tolist() == [[2, 0, 2, 0], [0, 1, 1, 0]]
    assert plan.bytes_K.tolist() == [2 * 10**9, 10**9, 3 * 10**9, 0]
    # Layer 0: GPUs 1, 2, 3 each move one expert over the network at 50 GB/s; layer 1: NVLink at
    # 200 GB/s and the network at the same time, so the network sets the time.
    np.testing.assert_allclose(plan.estimated_seconds_L(), [1 / 50, 1 / 50])
    s = plan.summary()
    assert (s["experts_moved"], s["bytes_moved"], s["bytes_copied_locally"]) == (4, 4 * 10**9, 2 * 10**9)
    assert s["estimated_seconds"] == pytest.approx(0.04) and s["staging_bytes_per_rank"] == 2 * 10**9


def test_per_rank_views_pair_sends_with_receives():
    old, new = [[0, 1, 2, 3, 4, 5, 0, 1]], [[1, 0, 2, 4, 4, 5, 3, 1]]
    plan = plan_reshard(placement(old, TOPO_2x2x2, 6), placement(new, TOPO_2x2x2, 6))
    send = plan.sends_of(1, 0)
    assert (send.peer_X.tolist(), send.src_slot_X.tolist(), send.expert_X.tolist()) == ([3], [3], [3])
    receive = plan.receives_of(3, 0)
    assert (receive.peer_X.tolist(), receive.dst_slot_X.tolist()) == ([1], [6])
    assert plan.receives_of(1, 0).peer_X.tolist() == [2] and plan.sends_of(2, 0).peer_X.tolist() == [1]
    assert plan.copies_of(0, 0).dst_slot_X.tolist() == [0, 1] and len(plan.sends_of(0, 0).peer_X) == 0
    # Every send is some rank's receive, and vice versa.
    sends = sorted(t for r in range(4) for t in plan.sends_of(r, 0).dst_slot_X.tolist())
    assert sends == sorted(t for r in range(4) for t in plan.receives_of(r, 0).dst_slot_X.tolist())


def test_a_gpu_wanting_an_expert_twice_receives_it_once():
    topo = Topology(num_gpus=2, gpus_per_node=1, slots_per_gpu=2)
    old, new = [[0, 1, 2, 0]], [[2, 2, 0, 1]]
    before, after = placement(old, topo, 3), placement(new, topo, 3)
    plan = plan_reshard(before, after)
    assert transfers(plan, 0) == [(2, 0, 2, N_), (0, 1, 2, F_), (3, 2, 0, L_), (1, 3, 1, N_)]
    assert plan.experts_moved_L.tolist() == moves(before, after).experts_L.tolist() == [2]
    np.testing.assert_array_equal(apply_plan(np.array(old), plan), new)
    assert plan.staging_slots_LG.tolist() == [[1, 2]]  # the second slot reuses the received buffer


def test_sources_prefer_the_same_node_and_balance_senders():
    topo = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=3)
    # Expert 3 sits on GPU 1 (node 0) and GPU 2 (node 1): GPU 3 must take it from GPU 2.
    # Experts 0 and 1 sit on GPUs 0 and 1 only: GPUs 2 and 3 each get one from a different sender,
    # where slot-index order would make GPU 0 send both.
    old = [[0, 1, 2, 0, 1, 3, 2, 3, 4, 4, 5, 5]]
    new = [[0, 1, 2, 0, 1, 3, 2, 0, 4, 3, 5, 1]]
    plan = plan_reshard(placement(old, topo, 6), placement(new, topo, 6))
    got = {d: (s // 3, Link(k)) for s, d, _, k in transfers(plan, 0)}
    assert got[9] == (2, I_)
    assert got[7][1] == got[11][1] == N_ and {got[7][0], got[11][0]} == {0, 1}


def test_incompatible_placements_name_the_values_the_right_way_round():
    # The current layout may itself be named "request body" (applied earlier): roles, not sources.
    a = placement([[0, 1, 2, 3, 4, 5, 0, 1]], TOPO_2x2x2, 6, "request body")
    other_topo = Topology(num_gpus=4, gpus_per_node=1, slots_per_gpu=2)
    for new, what in [
        (placement([[0, 1, 2, 3, 4, 5, 6, 1]], TOPO_2x2x2, 7, "b.json"), "num_experts is 7, the current layout's is 6"),
        (Placement(a.phy2log_LP, 6, TOPO_2x2x2, np.array([4]), source="b.json"), "layers is [4], the current layout's is [3]"),
        (placement([[0, 1, 2, 3, 4, 5, 0, 1]], other_topo, 6, "b.json"), "gpus_per_node is 1, the current layout's is 2"),
        (placement([[0, 1, 2, 3, 4, 5]], Topology(3, 1, 2), 6, "b.json"), "num_gpus is 3, the current layout's is 4"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"b.json: cannot reshard to it: its {what}")):
            plan_reshard(a, new)


def test_apply_plan_rejects_a_plan_for_another_layout():
    old, new = [[0, 1, 2, 3, 4, 5, 0, 1]], [[1, 0, 2, 4, 4, 5, 3, 1]]
    plan = plan_reshard(placement(old, TOPO_2x2x2, 6), placement(new, TOPO_2x2x2, 6))
    with pytest.raises(AssertionError, match="gets expert"):
        apply_plan(np.array([[0, 1, 2, 5, 4, 3, 0, 1]]), plan)


def test_module_does_not_import_torch():
    code = "import sys, moeplace.runtime.reshard_plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=100, deadline=None)
@given(pair=placement_pairs())
def test_layer_shares_move_contiguous_rows_that_build_the_new_layout(pair):
    """The mover's arrangement, simulated on expert ids: each rank's send rows to a peer, taken as one
    contiguous block, land in that peer's receive rows in the same order; then staging rows and fan-out
    copies written into the slots give the new layout."""
    from moeplace.runtime.reshard_share import LayerShare

    old, new = pair
    plan, topo = plan_reshard(old, new), old.topology
    S, G = topo.slots_per_gpu, topo.num_gpus
    for row in np.unique(plan.layer_X):
        slots_GS = old.phy2log_LP[row].reshape(G, S).copy()
        shares = [LayerShare.of(plan, g, int(row)) for g in range(G)]
        for q, share in enumerate(shares):
            staging = np.full(len(share.staged_dst_N), -1)
            staging[:share.n_local] = slots_GS[q, share.local_src_N]
            for r, (lo, hi) in zip(share.recv_peers, share.recv_spans):
                sender = shares[r]
                a, b = sender.send_spans[sender.send_peers.index(q)]
                assert b - a == hi - lo
                staging[lo:hi] = old.phy2log_LP[row].reshape(G, S)[r, sender.send_src_N[a:b]]
                pulled = share.recv_src_N[lo - share.n_local:hi - share.n_local]
                assert (pulled == sender.send_src_N[a:b]).all()
                assert (np.diff(pulled) > 0).all()  # by the sender's slot: its consecutive slots, one copy
            assert (staging == share.staged_expert_N).all()
            slots_GS[q, share.staged_dst_N] = staging
            slots_GS[q, share.fanout_dst_X] = staging[share.fanout_src_X]
        assert (slots_GS.reshape(-1) == new.phy2log_LP[row]).all()
