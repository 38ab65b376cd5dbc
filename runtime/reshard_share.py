"""`LayerShare`: one rank's part of one layer of a `ReshardPlan`, arranged for contiguous transfers;
`overlaps`: which consecutive layers may be in flight together within the staging budget (`Overlaps`).

Pure numpy, like the plan. Both ends of a pair order its experts the same way (by the sender's slot),
so the rows a sender gathers for a peer, taken as one block, land in the same order in the
receiver's block of rows from that sender: one transfer per tensor per peer, whatever the experts;
and a receiver that pulls copies each run of the sender's consecutive slots at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.runtime.reshard_plan import Link, ReshardPlan


@dataclass(frozen=True, kw_only=True)
class LayerShare:
    """One rank's share of one layer row, arranged for contiguous transfers (slots 0..S-1, int64).

    Staging rows: [0, n_local) the LOCAL copies of local_src_N; then the receives, grouped by peer and
    ordered by the peer's slot:
    recv_peers[i] fills rows recv_spans[i] (half-open, absolute), whose experts sit in the peer's
    slots recv_src_N (one per received row, same order). Sends: send_src_N grouped by peer;
    send_peers[i] gets entries send_spans[i]. staged_dst_N / staged_expert_N: every staging row's slot
    here and expert; fanout_dst_X / fanout_src_X: further slots filled from staging row fanout_src_X."""

    local_src_N: np.ndarray
    recv_peers: tuple[int, ...]
    recv_spans: tuple[tuple[int, int], ...]
    recv_src_N: np.ndarray
    send_src_N: np.ndarray
    send_peers: tuple[int, ...]
    send_spans: tuple[tuple[int, int], ...]
    staged_dst_N: np.ndarray
    staged_expert_N: np.ndarray
    fanout_dst_X: np.ndarray
    fanout_src_X: np.ndarray

    @property
    def n_local(self) -> int:
        return len(self.local_src_N)

    @classmethod
    def of(cls, plan: ReshardPlan, rank: int, row: int) -> LayerShare:
        S = plan.topology.slots_per_gpu
        copies, recvs, sends = plan.copies_of(rank, row), plan.receives_of(rank, row), plan.sends_of(rank, row)
        local = copies.kind_X == Link.LOCAL
        # within a peer, by the sender's slot on both ends: a pull copies each run of consecutive slots
        # at once (copy engines pay per copy), and sender and receiver list the experts alike
        by_peer = np.lexsort((recvs.src_slot_X, recvs.peer_X))
        recv_peers, recv_spans = _spans(recvs.peer_X[by_peer], offset=int(local.sum()))
        send_order = np.lexsort((sends.src_slot_X, sends.peer_X))
        send_peers, send_spans = _spans(sends.peer_X[send_order], offset=0)
        staged_dst = np.concatenate([copies.dst_slot_X[local], recvs.dst_slot_X[by_peer]])
        fanout = ~local  # LOCAL_FROM_RECEIVED: from the staging row whose slot received the expert
        by_slot = np.argsort(staged_dst)
        fan_src = by_slot[np.searchsorted(staged_dst, copies.src_slot_X[fanout], sorter=by_slot)]
        return cls(local_src_N=copies.src_slot_X[local] % S, recv_peers=recv_peers, recv_spans=recv_spans,
                   recv_src_N=recvs.src_slot_X[by_peer] % S, send_src_N=sends.src_slot_X[send_order] % S,
                   send_peers=send_peers, send_spans=send_spans, staged_dst_N=staged_dst % S,
                   staged_expert_N=np.concatenate([copies.expert_X[local], recvs.expert_X[by_peer]]),
                   fanout_dst_X=copies.dst_slot_X[fanout] % S, fanout_src_X=fan_src)


def _spans(peer_X: np.ndarray, offset: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """peer_X grouped (sorted) -> (peers, [lo, hi) rows of each, shifted by offset)."""
    peers, starts, counts = np.unique(peer_X, return_index=True, return_counts=True)
    return (tuple(int(p) for p in peers),
            tuple((offset + int(s), offset + int(s + c)) for s, c in zip(starts, counts)))


@dataclass(frozen=True)
class Overlaps:
    """Per position i of a job's rows: pair[i], rows[i + 1] may be posted before rows[i] finishes (both
    fit the staging budget on every rank); free[i], it surely finds room then: rows[0..i + 1] all fit
    together, so no earlier layer's install is needed. Where pair[i] holds and free[i] does not, the
    ranks ask each other whether the room is there now (`LayerMover`)."""

    pair: tuple[bool, ...]
    free: tuple[bool, ...]


def overlaps(plan: ReshardPlan, rows: list[int], expert_bytes: int, budget: int, pushed: tuple) -> Overlaps:
    """The staging a layer takes on its busiest rank, send rows included: those of the links in `pushed`
    (a peer that pulls reads the sender's slots, no send rows), against the budget. The plan decides,
    so all ranks run the same schedule."""
    S, sent_LG = plan.topology.slots_per_gpu, np.zeros_like(plan.staging_slots_LG)
    x = np.isin(plan.kind_X, pushed)
    np.add.at(sent_LG, (plan.layer_X[x], plan.src_slot_X[x] // S), 1)
    staging = (plan.staging_slots_LG + sent_LG).max(axis=1) * expert_bytes
    pair = [bool(staging[a] + staging[b] <= budget) for a, b in zip(rows, rows[1:])] + [False]
    upto = np.cumsum([staging[r] for r in rows])
    free = [bool(upto[i + 1] <= budget) for i in range(len(rows) - 1)] + [False]
    return Overlaps(tuple(pair), tuple(free))
