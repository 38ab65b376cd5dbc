"""`ReshardPlan`: the local copies and GPU-to-GPU transfers that turn one placement into another.

Pure and CPU-only (numpy + networkx, never torch), so `moeplace apply` and the tests use it without a
process group; the runtime executes it. Dimensions: layer row L, slot P, GPU/rank G, transfer X.

Execution contract, per layer (`apply_plan` is its reference):
  1. stage: each LOCAL copy reads its old source slot into a staging buffer. Nothing is written yet,
     so every read sees the old layout, even where the source slot is itself overwritten in this
     layer (two slots swapping experts, a GPU that sends one expert and receives another there).
  2. transfer: each rank posts `sends_of` (read straight from old slots, still untouched) and
     `receives_of` (into staging buffers) in plan order, which both ends of a pair share, as one
     batch_isend_irecv, and waits for all of them.
  3. write, between two serving steps: staging buffers into destination slots, then each
     LOCAL_FROM_RECEIVED copy from the buffer its source slot received.
  4. swap the layer's routing table to the new placement.
Steps 1-2 only read slots, so serving continues on the old table meanwhile; steps 3-4 change what
slots hold, so they run together at one step boundary. A rank stages `staging_slots_LG[l, g]` experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum

import networkx as nx
import numpy as np

from moeplace.placement import Placement
from moeplace.placer.evaluate import experts_on_gpus, moves
from moeplace.topology import Topology


class Link(IntEnum):
    LOCAL = 0  # slot to slot on one GPU (a device copy, no link)
    INTRA_NODE = 1  # NVLink
    INTER_NODE = 2  # network
    LOCAL_FROM_RECEIVED = 3  # a GPU wanting an expert in several slots receives it once, then copies


NETWORK_LINKS = (Link.INTRA_NODE, Link.INTER_NODE)


@dataclass(frozen=True)
class RankTransfers:
    """One rank's share of one layer, in plan order. peer_X: the other rank (the destination of a
    send, the source of a receive, the rank itself for a copy)."""

    peer_X: np.ndarray
    src_slot_X: np.ndarray
    dst_slot_X: np.ndarray
    expert_X: np.ndarray
    kind_X: np.ndarray


@dataclass(frozen=True)
class ReshardPlan:
    """Transfers X sorted by (layer row, destination slot); a destination appears once per layer.

    layers [L]: model layer ids of the rows. layer_X: row of each transfer; src_slot_X holds
    expert_X in the old layout (for LOCAL_FROM_RECEIVED: the slot of this layer that receives it);
    dst_slot_X holds it in the new one. min_moves_L [L]: (expert, GPU) pairs of the new layout
    missing from the old (placer.evaluate.moves), which the network transfers must equal.
    """

    topology: Topology
    num_experts: int
    layers: np.ndarray
    layer_X: np.ndarray
    src_slot_X: np.ndarray
    dst_slot_X: np.ndarray
    expert_X: np.ndarray
    kind_X: np.ndarray
    min_moves_L: np.ndarray

    def __post_init__(self) -> None:
        L, X, topo = len(self.layers), len(self.layer_X), self.topology
        for name in ("src_slot_X", "dst_slot_X", "expert_X", "kind_X"):
            assert getattr(self, name).shape == (X,), f"{name} has shape {getattr(self, name).shape}, not ({X},)"
        assert self.min_moves_L.shape == (L,), f"min_moves_L has shape {self.min_moves_L.shape}, not ({L},)"
        order = self.layer_X * topo.num_slots + self.dst_slot_X
        assert (np.diff(order) > 0).all(), "transfers must be sorted by (layer, dst slot), one per dst slot"
        assert ((0 <= self.layer_X) & (self.layer_X < L)).all(), f"layer_X outside [0, {L})"
        for name in ("src_slot_X", "dst_slot_X"):
            slots = getattr(self, name)
            assert ((0 <= slots) & (slots < topo.num_slots)).all(), f"{name} outside [0, {topo.num_slots})"
        assert ((0 <= self.expert_X) & (self.expert_X < self.num_experts)).all(), "expert_X out of range"
        assert (self.src_slot_X != self.dst_slot_X).all(), "a transfer onto its own source slot"
        assert np.isin(self.kind_X, list(Link)).all(), f"kind_X outside {[int(k) for k in Link]}"
        link_X = self._link_between(self.src_slot_X, self.dst_slot_X)
        got = link_X == np.where(self.kind_X == Link.LOCAL_FROM_RECEIVED, Link.LOCAL, self.kind_X)
        assert got.all(), f"kind_X disagrees with the topology at transfers {np.flatnonzero(~got)[:5].tolist()}"
        network, fanout = np.isin(self.kind_X, NETWORK_LINKS), self.kind_X == Link.LOCAL_FROM_RECEIVED
        received = np.isin(self.layer_X[fanout] * topo.num_slots + self.src_slot_X[fanout], order[network])
        assert received.all(), "a LOCAL_FROM_RECEIVED copy whose source slot receives nothing in that layer"
        moved_L = self.experts_moved_L
        assert (moved_L == self.min_moves_L).all(), f"moves {moved_L.tolist()}, minimum {self.min_moves_L.tolist()}"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _link_between(self, src_slot: np.ndarray, dst_slot: np.ndarray) -> np.ndarray:
        S, per_node = self.topology.slots_per_gpu, self.topology.gpus_per_node
        src_gpu, dst_gpu = src_slot // S, dst_slot // S
        same_node = src_gpu // per_node == dst_gpu // per_node
        return np.where(src_gpu == dst_gpu, Link.LOCAL, np.where(same_node, Link.INTRA_NODE, Link.INTER_NODE))

    @property
    def moved_LK(self) -> np.ndarray:
        """[L, 4] transfers per layer row and Link kind."""
        out = np.zeros((self.num_layers, len(Link)), dtype=np.int64)
        np.add.at(out, (self.layer_X, self.kind_X), 1)
        return out

    @property
    def experts_moved_L(self) -> np.ndarray:
        """[L] experts crossing a link (NVLink or network) per layer row."""
        return self.moved_LK[:, list(NETWORK_LINKS)].sum(axis=1)

    @property
    def bytes_K(self) -> np.ndarray:
        """[4] bytes written per Link kind (local kinds are device copies)."""
        return self.moved_LK.sum(axis=0) * self.topology.expert_bytes

    def estimated_seconds_L(self) -> np.ndarray:
        """[L] transfer time per layer: the busiest GPU's busiest link, NVLink and network running
        concurrently and full duplex (a GPU's time on a link is max(bytes sent, bytes received) /
        bandwidth). Device copies (TB/s) are left out."""
        topo, L = self.topology, self.num_layers
        out = np.zeros(L)
        for kind, gbps in ((Link.INTRA_NODE, topo.nvlink_gbps), (Link.INTER_NODE, topo.network_gbps)):
            x = self.kind_X == kind
            sent_LG, received_LG = np.zeros((L, topo.num_gpus)), np.zeros((L, topo.num_gpus))
            np.add.at(sent_LG, (self.layer_X[x], self.src_slot_X[x] // topo.slots_per_gpu), 1)
            np.add.at(received_LG, (self.layer_X[x], self.dst_slot_X[x] // topo.slots_per_gpu), 1)
            busiest_L = np.maximum(sent_LG, received_LG).max(axis=1)
            out = np.maximum(out, busiest_L * topo.expert_bytes / (gbps * 1e9))
        return out

    @property
    def staging_slots_LG(self) -> np.ndarray:
        """[L, G] staging buffers (one expert each) a rank needs in steps 1-3 of a layer."""
        x = self.kind_X != Link.LOCAL_FROM_RECEIVED  # these reuse their receive's buffer
        out = np.zeros((self.num_layers, self.topology.num_gpus), dtype=np.int64)
        np.add.at(out, (self.layer_X[x], self.dst_slot_X[x] // self.topology.slots_per_gpu), 1)
        return out

    def sends_of(self, rank: int, l: int) -> RankTransfers:
        """What `rank` sends in layer row l (plan.layers[l] is the model layer id), read from old slots."""
        return self._select(l, self.src_slot_X, rank, NETWORK_LINKS, peer=self.dst_slot_X)

    def receives_of(self, rank: int, l: int) -> RankTransfers:
        """What `rank` receives in layer row l, into staging buffers; its sender posts it in the same order."""
        return self._select(l, self.dst_slot_X, rank, NETWORK_LINKS, peer=self.src_slot_X)

    def copies_of(self, rank: int, l: int) -> RankTransfers:
        """LOCAL copies (step 1) and LOCAL_FROM_RECEIVED copies (step 3) on `rank`."""
        return self._select(l, self.dst_slot_X, rank, (Link.LOCAL, Link.LOCAL_FROM_RECEIVED), peer=self.dst_slot_X)

    def _select(self, l: int, slot_X: np.ndarray, rank: int, kinds, peer: np.ndarray) -> RankTransfers:
        S = self.topology.slots_per_gpu
        x = np.flatnonzero((self.layer_X == l) & (slot_X // S == rank) & np.isin(self.kind_X, kinds))
        return RankTransfers(peer[x] // S, self.src_slot_X[x], self.dst_slot_X[x], self.expert_X[x], self.kind_X[x])

    def summary(self) -> dict:
        moved_K = self.moved_LK.sum(axis=0)
        return {
            "experts_moved": int(self.experts_moved_L.sum()),
            "min_moves": int(self.min_moves_L.sum()),
            **{f"{k.name.lower()}_transfers": int(moved_K[k]) for k in Link},
            "bytes_moved": int(self.bytes_K[list(NETWORK_LINKS)].sum()),
            "bytes_copied_locally": int(self.bytes_K[[Link.LOCAL, Link.LOCAL_FROM_RECEIVED]].sum()),
            "estimated_seconds": float(self.estimated_seconds_L().sum()),
            "staging_bytes_per_rank": int(self.staging_slots_LG.max(initial=0) * self.topology.expert_bytes),
        }


def plan_reshard(old: Placement, new: Placement) -> ReshardPlan:
    """The plan that turns `old` into `new` moving the fewest experts; ValueError if they do not
    describe the same experts, layers and topology shape."""
    _check_compatible(old, new)
    rows_X4 = [np.array(_plan_layer(old, new, l), dtype=np.int64).reshape(-1, 4) for l in range(old.num_layers)]
    rows_X4 = [rows[np.argsort(rows[:, 1])] for rows in rows_X4]
    all_X4 = np.concatenate(rows_X4)
    return ReshardPlan(
        topology=old.topology,  # the deployment the bytes move on
        num_experts=old.num_experts,
        layers=old.layers,
        layer_X=np.repeat(np.arange(old.num_layers), [len(r) for r in rows_X4]),
        src_slot_X=all_X4[:, 0],
        dst_slot_X=all_X4[:, 1],
        expert_X=all_X4[:, 2],
        kind_X=all_X4[:, 3],
        min_moves_L=moves(old, new).experts_L,
    )


def _check_compatible(old: Placement, new: Placement) -> None:
    a, b = old.topology, new.topology
    # gpus_per_node too: it decides which transfers cross the network.
    for what, x, y in (
        ("num_experts", old.num_experts, new.num_experts),
        ("layers", old.layers.tolist(), new.layers.tolist()),
        ("num_gpus", a.num_gpus, b.num_gpus),
        ("gpus_per_node", a.gpus_per_node, b.gpus_per_node),
        ("slots_per_gpu", a.slots_per_gpu, b.slots_per_gpu),
    ):
        if x != y:
            # Named by role, not by source: a layout applied earlier is itself named "request body".
            raise ValueError(f"{new.source}: cannot reshard to it: its {what} is {y}, the current layout's is {x}")


def _plan_layer(old: Placement, new: Placement, l: int) -> list[tuple[int, int, int, int]]:
    """(src slot, dst slot, expert, Link) of layer row l, in no particular order.

    The new layout is reached exactly: slot indices are what the routing table, split_LP and the
    exporters address, so an expert that only changes slot on its GPU is a LOCAL copy, not a
    re-labelling. Only slots whose expert changes are written."""
    topo = old.topology
    S, per_node = topo.slots_per_gpu, topo.gpus_per_node
    old_P, new_P = old.phy2log_LP[l], new.phy2log_LP[l]
    old_GE = experts_on_gpus(old, l)
    old_NE = old_GE.reshape(topo.num_nodes, per_node, -1).any(axis=1)
    out, wanted = [], {}  # wanted[(gpu, expert)] = destination slots on a GPU without the expert
    # Step 1: local copies. Any old copy on the GPU serves (all are read before any write), at cost 0.
    for t in np.flatnonzero(old_P != new_P):
        g, e = t // S, new_P[t]
        if old_GE[g, e]:
            out.append((_slot_of(old_P, g, S, e), t, e, Link.LOCAL))
        else:
            wanted.setdefault((g, e), []).append(t)
    # Step 2: one receive per wanted (GPU, expert): exactly moves()'s minimum. Candidate senders are
    # the old holders in the nearest link class (same node if any, else every holder).
    receives = []
    for (g, e), slots in wanted.items():
        node = g // per_node
        holders = np.flatnonzero(old_GE[:, e])
        same_node = holders[holders // per_node == node]
        kind = Link.INTRA_NODE if old_NE[node, e] else Link.INTER_NODE
        receives.append((slots[0], e, kind, same_node if len(same_node) else holders))
        out += [(slots[0], t, e, Link.LOCAL_FROM_RECEIVED) for t in slots[1:]]
    # Step 3: pick a sender per receive, balancing sends per GPU and link.
    for (t, e, kind, _), h in zip(receives, _balance_senders(receives)):
        out.append((_slot_of(old_P, h, S, e), t, e, kind))
    return out


def _slot_of(old_P: np.ndarray, gpu: int, S: int, expert: int) -> int:
    # The first copy: copies on one GPU cost the same, and staging makes overwrite order irrelevant.
    return gpu * S + int(np.flatnonzero(old_P[gpu * S : (gpu + 1) * S] == expert)[0])


def _balance_senders(receives: list) -> list[int]:
    """One sender GPU per receive (dst slot, expert, kind, candidate GPUs) by min-cost flow.

    supply -> (GPU h, link kind) -> receive. The k-th unit (k = 0, 1, ...) into (h, kind) costs k,
    every other arc 0, all capacities 1: the total is sum over (h, kind) of n(n-1)/2 for its n sends,
    convex, so the optimum spreads sends evenly over the candidates (it also minimises the busiest
    sender's count: separable convex minimisation over a polymatroid base). Integer costs keep
    networkx's network simplex exact. Link kinds are balanced separately: NVLink and the NIC are
    different wires.
    """
    if not receives:
        return []
    graph = nx.MultiDiGraph()
    graph.add_node("supply", demand=-len(receives))
    can_serve = Counter()
    for r, (_, _, kind, senders) in enumerate(receives):
        graph.add_node(("receive", r), demand=1)
        for h in senders:
            graph.add_edge(("send", int(h), int(kind)), ("receive", r), capacity=1, weight=0)
            can_serve[int(h), int(kind)] += 1
    for (h, kind), n in can_serve.items():
        for k in range(n):
            graph.add_edge("supply", ("send", h, kind), capacity=1, weight=k)
    flow = nx.min_cost_flow(graph)
    return [
        next(int(h) for h in senders if flow[("send", int(h), int(kind))][("receive", r)][0] == 1)
        for r, (_, _, kind, senders) in enumerate(receives)
    ]


def apply_plan(old_phy2log_LP: np.ndarray, plan: ReshardPlan) -> np.ndarray:
    """phy2log_LP [L, P] after simulating `plan` on `old_phy2log_LP` in the contract's order.

    Solver-independent: it moves slot contents as the runtime would, so the result equals the new
    placement only if the plan is right. Asserts every read finds the expert the plan names and
    that no write leaves a slot's expert unchanged (a move that moves nothing)."""
    old_LP = np.asarray(old_phy2log_LP)
    assert old_LP.shape == (plan.num_layers, plan.topology.num_slots), f"old layout shape {old_LP.shape}"
    out_LP = old_LP.copy()
    for l in range(plan.num_layers):
        x = np.flatnonzero(plan.layer_X == l)
        src, dst, expert, kind = plan.src_slot_X[x], plan.dst_slot_X[x], plan.expert_X[x], plan.kind_X[x]
        # 1.-2. copies and sends read the old layout; whatever they read is staged by destination.
        first = kind != Link.LOCAL_FROM_RECEIVED
        staged = dict(zip(dst[first].tolist(), old_LP[l, src[first]].tolist()))
        # 3. writes: staged buffers, then copies of received buffers.
        for s, t in zip(src[~first].tolist(), dst[~first].tolist()):
            assert s in staged and kind[dst == s][0] in NETWORK_LINKS, f"layer {l}: slot {t} copies {s}, not a receive"
            staged[t] = staged[s]
        for t, value in staged.items():
            want = expert[dst == t][0]
            assert value == want, f"layer {l}: slot {t} gets expert {value}, the plan says {want}"
            assert old_LP[l, t] != value, f"layer {l}: slot {t} already holds expert {value}"
            out_LP[l, t] = value
    return out_LP
