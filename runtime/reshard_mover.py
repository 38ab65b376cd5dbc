"""`LayerMover`: one rank's part of a `ReshardPlan`, layer after layer, on the reshard thread.

Per layer (numbers as in the plan's execution contract, runtime/reshard_plan.py):
  post    1. stage: one allocation of slot-shaped staging rows, [local copies | receives, grouped by
             peer]; the LOCAL copies read into them from the old slots, and the experts sent to each
             peer gathered into contiguous send rows (one gather per tensor for each);
          2. handshake: meet this layer's peers on the host-side control group (when transfers run
             on NCCL: a late peer is then waited for on the host, and named);
          3. post: per peer, one transfer per tensor of all its rows (or per chunk of rows, paced to
             the rate limit): host work grows with peers, not experts;
  finish  4. wait for the transfers; one that completed past `timeout_s` fails the layer, but is
             waited out, never abandoned (a pending op would match the next layer's);
          5. check: every staged expert against the checksum table, one read of its bytes, then
             one all-reduce of "ok" over every rank (the failing rank's reason follows);
          6. hand over: the staged layer is installed by the serving thread at a step boundary.
Layers are double-buffered: layer i+1 is posted before layer i finishes where the staging budget
holds both on every rank, so the link never idles while a layer is checked, agreed and handed over;
but never where posting it would first wait for an earlier layer's install (a step boundary): layer
i, transferred, would wait there too, unchecked, and miss that boundary's swap (measured in a loaded
server: a step of ~50 ms lost per pair of layers). The plan decides, and where it cannot (room that
installs free), one all-reduce of "room now" over every rank: every rank runs the same control ops in
the same order.
Both ends of a pair order its experts the same way (by the sender's slot), so a sender's
contiguous rows land in the receiver's contiguous rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moeplace.runtime.reshard_check import LayerChecks
from moeplace.runtime.reshard_ipc import PeerCopies
from moeplace.runtime.reshard_options import Pacer, ReshardOptions
from moeplace.runtime.reshard_plan import NETWORK_LINKS, Link, ReshardPlan
from moeplace.runtime.reshard_share import LayerShare, overlaps
from moeplace.runtime.reshard_watch import Watch
from moeplace.runtime.reshard_wire import ChecksumTable
from moeplace.runtime.slots import SlotWeights, StagedLayer, as_words, gather_rows, to_device, warm_pinned


@dataclass(frozen=True)
class _Posted:
    """A layer between post and finish. outbox: the gathered send rows, alive until the transfers are
    done; checks: the staged rows' checksums, as they land."""

    row: int
    staged: StagedLayer | None
    expected_N: np.ndarray
    checks: LayerChecks
    outbox: SlotWeights | None
    watch: Watch | None
    error: str | None


@dataclass(frozen=True)
class _Move:
    """One transfer: a P2POp, or a pull (peer, layer row, peer's slots, destination rows); bytes for
    the pacer; rows: the staging rows [lo, hi) it fills (None: a send)."""

    op: object
    peer: int
    bytes_in: int
    bytes_out: int
    rows: tuple[int, int] | None = None


class LayerMover:
    """moe_layers: this rank's EPMoE per layer row; `group` moves the bytes, `control` (gloo, the
    same ranks) carries agreements and handshakes; `handover` gets the staged layers."""

    def __init__(self, moe_layers: list, group, control, rank: int, options: ReshardOptions,
                 checksums: ChecksumTable, peer_copies: PeerCopies | None = None) -> None:
        self.moe_layers, self.group, self.control, self.rank = moe_layers, group, control, rank
        self.options, self.checksums, self.peer_copies = options, checksums, peer_copies
        self.device = moe_layers[0].w13_SFD.device
        self.expert_bytes = moe_layers[0].read_slot(0).nbytes
        priority = options.stream_priority
        self.check_stream = torch.cuda.Stream(self.device, priority) if self.device.type == "cuda" else None
        # a stream per layer in flight (two) for the watches: one shared stream would make a layer's
        # watch wait for the next layer's transfers too
        self.watch_streams = [torch.cuda.Stream(self.device, priority) for _ in range(2)] \
            if self.device.type == "cuda" else [None, None]
        self.posts = 0
        # each layer's slot tensors as words, made once (installs write in place: the views stay valid)
        self.slot_words = [[as_words(t) for t in m.read_slot(slice(None)).tensors()] for m in moe_layers]

    def warm_up(self) -> None:
        """Every device operation of a layer once, on scratch rows, so that a server's first reshard
        pays no first-use costs (kernel loading, pinned host memory, peer access) in its layers' time."""
        moe = self.moe_layers[0]
        scratch, row = SlotWeights.empty_like(moe.read_slot(0), 2), SlotWeights.empty_like(moe.read_slot(0), 1)
        checks = self._checks(scratch, 1, lambda rows: None)
        gather_rows(self.slot_words[0], np.array([0, 0]), checks.words)
        checks.local_gathered()
        works = [self.peer_copies.pull(peer, 0, np.array([0]), scratch.rows(1, 2))
                 for peer in range(dist.get_world_size(self.group)) if self._pulled(peer)]
        checks.landed(1, 2, works)
        checks.close()
        checks.sums()
        index = to_device(np.array([1]), self.device)
        for t, one in zip(scratch.tensors(), row.tensors()):  # as EPMoE.install
            as_words(t).index_copy_(0, index, as_words(one))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
            # pinned blocks for an index list, a layer's sums, a swap's routing tables (`EPMoE.use_layout`)
            table = moe.table
            warm_pinned(max(8 * moe.w13_SFD.shape[0], *(t.numel() * t.element_size() for t in
                                                        (moe.phy2log_P, table.log2phy_ER, table.node_ER,
                                                         table.share_ER))))

    def _checks(self, buffers: SlotWeights, n_local: int, received) -> LayerChecks:
        return LayerChecks(buffers, n_local, received, self.check_stream, self.moe_layers[0].w13_SFD.shape[0])

    def run(self, plan: ReshardPlan, target_LP: np.ndarray, fault, handover, laps) -> str | None:
        """Every layer of `plan`; None on success, else the first failure, agreed by all ranks.
        handover: .reserve(nbytes) .stage(row, staged) .commit(row, phy2log_P) .discard(row); laps(phase, row), and
        laps.mark(point, row) for points within a phase (timeline only)."""
        rows = [int(r) for r in np.unique(plan.layer_X)]
        # copy engines (on every rank or none: the same options) reach the peers of a node
        pushed = (Link.INTER_NODE,) if self.peer_copies is not None else NETWORK_LINKS
        overlap = overlaps(plan, rows, self.expert_bytes, self.options.staging_bytes, pushed)
        pacer, posted, error = Pacer(self.options.rate_bytes_per_s), deque(), None
        for i, row in enumerate(rows):
            if not posted:
                posted.append(self._post(plan, row, target_LP, fault, handover, pacer, laps))
            if overlap.pair[i] and (overlap.free[i] or self._room_everywhere(plan, rows[i + 1], handover)):
                posted.append(self._post(plan, rows[i + 1], target_LP, fault, handover, pacer, laps))
            error = self._finish(plan, posted.popleft(), fault, handover, laps)
            if error is not None:
                break
        for layer in posted:  # after a failure: drain what every rank posted, in the same order
            self._wait(layer)
            handover.discard(layer.row)
        return error

    # -- post ----------------------------------------------------------------------------------
    def _post(self, plan: ReshardPlan, row: int, target_LP, fault, handover, pacer: Pacer, laps) -> _Posted:
        layer, share = int(plan.layers[row]), LayerShare.of(plan, self.rank, row)
        moe, n = self.moe_layers[row], len(share.staged_dst_N)
        pushed_N, pushed_spans = self._pushed(share)
        handover.reserve(self._staging_bytes(share, pushed_N))
        laps("swap_wait", row)  # for installs to free staging room (else ~0)
        buffers = SlotWeights.empty_like(moe.read_slot(0), n)
        outbox = SlotWeights.empty_like(moe.read_slot(0), len(pushed_N)) if len(pushed_N) else None
        laps.mark("allocated", row)
        chunks = self._chunks(row, share, buffers, outbox, pushed_spans)
        laps.mark("pieces", row)
        checks = self._checks(buffers, share.n_local, lambda rows: fault.after_receive(layer, rows))
        laps.mark("checks_ready", row)
        # Unlimited, the pulls (copy engines: nothing to wait for on the peer, no gathered rows) go out
        # before this layer's gathers, so that a layer's first bytes move while the gathers run.
        early = self.options.rate_bytes_per_s <= 0 and self.peer_copies is not None
        pulls = self._post_paced([[m for m in c if not isinstance(m.op, dist.P2POp)] for c in chunks], pacer) \
            if early else []
        laps.mark("pulls_posted", row)
        # 1. stage
        error = None
        try:
            fault.before_stage(layer, self.rank)
            gather_rows(self.slot_words[row], share.local_src_N, [w[:share.n_local] for w in checks.words])
            checks.local_gathered()
            if outbox is not None:
                gather_rows(self.slot_words[row], pushed_N, [as_words(t) for t in outbox.tensors()])
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the agreement
            error = f"rank {self.rank}: {exc}"
        laps.mark("gathered", row)
        staged = StagedLayer(buffers, share.staged_dst_N, share.fanout_dst_X, share.fanout_src_X, target_LP[row])
        handover.stage(row, staged)
        expected_N = self.checksums.sums_LE[row, share.staged_expert_N]
        laps("stage", row)
        # 2. handshake (a peer late by more than the timeout fails the layer, pulled from or not; the
        # pulls are under way meanwhile), 3. post (even after a failure: what one rank posts, its
        # peers must match)
        fault.before_post(layer, self.rank, self.options.timeout_s)
        late = self._handshake(np.union1d(share.send_peers, share.recv_peers).astype(np.int64))
        rest = [[m for m in c if isinstance(m.op, dist.P2POp)] for c in chunks] if early else chunks
        works = []
        for chunk, chunk_works in pulls + self._post_paced(rest, pacer):
            for lo, hi in sorted({m.rows for m in chunk if m.rows is not None}):
                checks.landed(lo, hi, [work for work, _ in chunk_works])
            works += chunk_works
        checks.close()
        self.posts += 1
        watch = Watch(works, self.options.timeout_s, self.device, self.watch_streams[self.posts % 2]) \
            if works else None
        laps("post", row)
        return _Posted(row, staged, expected_N, checks, outbox, watch, error or late)

    def _staging_bytes(self, share: LayerShare, pushed_N: np.ndarray) -> int:
        """What a layer takes of the staging budget on this rank: its staged rows and send rows."""
        return (len(share.staged_dst_N) + len(pushed_N)) * self.expert_bytes

    def _room_everywhere(self, plan: ReshardPlan, row: int, handover) -> bool:
        """Whether every rank has staging room for `row` now, without waiting for an install."""
        share = LayerShare.of(plan, self.rank, row)
        room = handover.has_room(self._staging_bytes(share, self._pushed(share)[0]))
        return bool(self._reduce(int(room), dist.ReduceOp.MIN))

    def _pulled(self, peer: int) -> bool:
        """From a peer this process maps (copy engines, both ways), the receiver pulls: no send posted."""
        return self.peer_copies is not None and self.peer_copies.reaches(peer)

    def _pushed(self, share: LayerShare) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
        """The send rows to gather, those of peers that do not pull: their slots, and each such peer's
        rows [lo, hi) in the gather."""
        slots, spans, at = [np.zeros(0, dtype=np.int64)], {}, 0
        for peer, (lo, hi) in zip(share.send_peers, share.send_spans):
            if not self._pulled(peer):
                slots.append(share.send_src_N[lo:hi])
                spans[peer], at = (at, at + hi - lo), at + hi - lo
        return np.concatenate(slots), spans

    def _chunks(self, row: int, share: LayerShare, buffers: SlotWeights, outbox: SlotWeights | None,
                pushed_spans: dict[int, tuple[int, int]]) -> list[list[_Move]]:
        """This layer's transfers in chunks of `chunk_experts` rows per peer (the same on both ends of a
        pair): chunk k holds every peer's k-th piece, one op per tensor, sends first."""
        size, chunks = self.options.chunk_experts, {}
        for peer, (lo, hi) in pushed_spans.items():
            for k, a in enumerate(range(lo, hi, size)):
                chunks.setdefault(k, []).extend(_Move(self._op(dist.isend, t, peer), peer, 0, t.numel())
                                                for t in outbox.rows(a, min(a + size, hi)).wire())
        for peer, (lo, hi) in zip(share.recv_peers, share.recv_spans):
            for k, a in enumerate(range(lo, hi, size)):
                b = min(a + size, hi)
                if self._pulled(peer):
                    src_N = share.recv_src_N[a - share.n_local: b - share.n_local]
                    pull = (peer, row, src_N, buffers.rows(a, b))
                    chunks.setdefault(k, []).append(_Move(pull, peer, (b - a) * self.expert_bytes, 0, (a, b)))
                    continue
                chunks.setdefault(k, []).extend(_Move(self._op(dist.irecv, t, peer), peer, t.numel(), 0, (a, b))
                                                for t in buffers.rows(a, b).wire())
        return [chunks[k] for k in sorted(chunks)]

    def _op(self, kind, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(kind, tensor, peer, self.group)

    def _post_paced(self, chunks: list[list[_Move]], pacer: Pacer) -> list[tuple[list[_Move], list[tuple]]]:
        """Post each chunk once the rate limit allows (the larger of its bytes in and out):
        [(chunk, [(work, peer or peers)])]."""
        out = []
        for chunk in filter(None, chunks):
            pacer.wait(max(sum(m.bytes_in for m in chunk), sum(m.bytes_out for m in chunk)))
            ops, works = [m for m in chunk if isinstance(m.op, dist.P2POp)], []
            for peer, row, src_N, dst in (m.op for m in chunk if not isinstance(m.op, dist.P2POp)):
                works.append((self.peer_copies.pull(peer, row, src_N, dst), peer))
            if ops:
                posted, peers = dist.batch_isend_irecv([m.op for m in ops]), [m.peer for m in ops]
                # gloo: one work per op (a late one names its peer); NCCL: one for the batch
                one_each = len(posted) == len(peers)
                works += list(zip(posted, peers)) if one_each else [(w, sorted(set(peers))) for w in posted]
            out.append((chunk, works))
        return out

    def _handshake(self, peers: np.ndarray) -> str | None:
        if self.control is self.group or not len(peers):
            return None
        ops = [dist.P2POp(op, torch.zeros(1), int(p), self.control)
               for p in peers for op in (dist.isend, dist.irecv)]
        works = list(zip(dist.batch_isend_irecv(ops), [int(p) for p in peers for _ in range(2)]))
        return Watch(works, self.options.timeout_s, torch.device("cpu"), None).join()

    # -- finish --------------------------------------------------------------------------------
    def _finish(self, plan: ReshardPlan, posted: _Posted, fault, handover, laps) -> str | None:
        try:
            error = self._wait(posted) or posted.error
            laps("transfer", posted.row)
            error = error or self._verify(posted)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the agreement
            error = f"rank {self.rank}: {exc}"
        finally:
            posted.checks.drain()  # no check still reading the staging when it is freed
        error = self._agree(error)
        laps("check", posted.row)
        if error is not None:
            handover.discard(posted.row)
            return f"layer {int(plan.layers[posted.row])}: {error}"
        handover.commit(posted.row, posted.staged.phy2log_P)
        return None

    def _wait(self, posted: _Posted) -> str | None:
        """4. all of the layer's transfers done; why not in time, if they were late."""
        if posted.watch is None:
            return None
        late = posted.watch.join()
        if self.device.type == "cuda":
            for work, _ in posted.watch.works:
                work.wait()  # orders this stream after the transfers (done: no wait on the host)
        return f"rank {self.rank}: {late}" if late else None

    def _verify(self, posted: _Posted) -> str | None:
        """5. every staged row's checksum (summed as it landed) against the table, on the host."""
        bad = np.flatnonzero(posted.checks.sums() != posted.expected_N)
        if not len(bad):
            return None
        S = self.moe_layers[0].w13_SFD.shape[0]
        slot = int(posted.staged.dst_slot_N[bad[0]]) + self.rank * S
        return f"rank {self.rank}: checksum mismatch for slot {slot}"

    def _agree(self, error: str | None) -> str | None:
        """5. every rank learns whether all succeeded; the failing rank's message travels along."""
        failed = self._reduce(0 if error is None else self.rank + 1, dist.ReduceOp.MAX)
        if failed == 0:
            return None
        box = [error]
        dist.broadcast_object_list(box, src=failed - 1, group=self.control)
        return box[0]

    def _reduce(self, value: int, op) -> int:
        """`value` reduced over every rank on the control group."""
        device = self.device if self.control is self.group else "cpu"
        flag = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=op, group=self.control)
        return int(flag)
