"""`LayerMover`: one rank's part of a `ReshardPlan`, layer after layer, on the reshard thread.

Per layer (numbers as in the plan's execution contract, runtime/reshard_plan.py):
  post    1. stage: slot-shaped staging buffers; this rank's LOCAL copies read into them from the old
             slots (one gather per tensor);
          2. handshake: meet this layer's peers on the host-side control group (when transfers run
             on NCCL: a late peer is then waited for on the host, and named);
          3. post: receives straight into staging rows, sends straight from the old slots (no
             packing), in chunks paced to the rate limit;
  finish  4. wait for the transfers; one that completed past `timeout_s` fails the layer, but is
             waited out, never abandoned (a pending op would match the next layer's);
          5. verify: every staged expert against the checksum table, one read of its bytes;
          6. agree: one all-reduce of "ok" over every rank (the failing rank's reason follows);
          7. hand over: the staged layer is installed by the serving thread at a step boundary.
Layers are double-buffered: layer i+1 is posted before layer i finishes where the staging budget
holds both on every rank, so the link never idles while a layer is checked, agreed and handed over.
The schedule depends on the plan alone, so every rank runs the same control ops in the same order.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moeplace.runtime.reshard_ipc import PeerCopies
from moeplace.runtime.reshard_options import Pacer, ReshardOptions
from moeplace.runtime.reshard_plan import Link, ReshardPlan
from moeplace.runtime.reshard_wire import ChecksumTable, expert_sums
from moeplace.runtime.slots import SlotWeights, StagedLayer, as_words, to_device


@dataclass(frozen=True)
class _Posted:
    """A layer between post and finish. received: uint8 views of the received staging rows."""

    row: int
    staged: StagedLayer | None
    expected_N: np.ndarray
    received: list[torch.Tensor]
    watch: _Watch | None
    error: str | None


class LayerMover:
    """moe_layers: this rank's EPMoE per layer row; `group` moves the bytes, `control` (gloo, the
    same ranks) carries agreements and handshakes; `handover` gets the staged layers."""

    def __init__(self, moe_layers: list, group, control, rank: int, options: ReshardOptions,
                 checksums: ChecksumTable, peer_copies: PeerCopies | None = None) -> None:
        self.moe_layers, self.group, self.control, self.rank = moe_layers, group, control, rank
        self.options, self.checksums, self.peer_copies = options, checksums, peer_copies
        self.device = moe_layers[0].w13_SFD.device
        self.expert_bytes = moe_layers[0].read_slot(0).nbytes

    def run(self, plan: ReshardPlan, target_LP: np.ndarray, fault, handover, laps) -> str | None:
        """Every layer of `plan`; None on success, else the first failure, agreed by all ranks.
        handover: .reserve(nbytes) .stage(row, staged) .commit(row, phy2log_P) .discard(row); laps(phase)."""
        rows = [int(r) for r in np.unique(plan.layer_X)]
        overlap = _overlaps(plan, rows, self.expert_bytes, self.options.staging_bytes)
        pacer, posted, error = Pacer(self.options.rate_bytes_per_s), deque(), None
        for i, row in enumerate(rows):
            if not posted:
                posted.append(self._post(plan, row, target_LP, fault, handover, pacer))
                laps("stage")
            if i + 1 < len(rows) and overlap[i]:
                posted.append(self._post(plan, rows[i + 1], target_LP, fault, handover, pacer))
                laps("stage")
            error = self._finish(plan, posted.popleft(), fault, handover)
            laps("transfer")
            if error is not None:
                break
        for layer in posted:  # after a failure: drain what every rank posted, in the same order
            self._wait(layer)
            handover.discard(layer.row)
        return error

    # -- post ----------------------------------------------------------------------------------
    def _post(self, plan: ReshardPlan, row: int, target_LP, fault, handover, pacer: Pacer) -> _Posted:
        layer, S = int(plan.layers[row]), plan.topology.slots_per_gpu
        moe = self.moe_layers[row]
        copies, recvs = plan.copies_of(self.rank, row), plan.receives_of(self.rank, row)
        sends = plan.sends_of(self.rank, row)
        local = copies.kind_X == Link.LOCAL
        n_local, n = int(local.sum()), int(local.sum()) + len(recvs.peer_X)
        handover.reserve(n * self.expert_bytes)
        # 1. stage: buffers [local copies, then receives in plan order]
        buffers = SlotWeights.empty_like(moe.read_slot(0), n)
        error = None
        try:
            fault.before_stage(layer, self.rank)
            _gather_slots(moe, copies.src_slot_X[local] % S, buffers, n_local)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the agreement
            error = f"rank {self.rank}: {exc}"
        fanout = ~local
        fan_src = np.searchsorted(recvs.dst_slot_X, copies.src_slot_X[fanout]) + n_local
        staged = StagedLayer(buffers, np.concatenate([copies.dst_slot_X[local], recvs.dst_slot_X]) % S,
                             copies.dst_slot_X[fanout] % S, fan_src, target_LP[row])
        handover.stage(row, staged)
        expected_N = self.checksums.sums_LE[row, np.concatenate([copies.expert_X[local], recvs.expert_X])]
        # 2. handshake, 3. post (even after a failure: what one rank posts, its peers must match)
        fault.before_post(layer, self.rank, self.options.timeout_s)
        late = self._handshake(np.union1d(sends.peer_X, recvs.peer_X))
        chunks, received = self._ops(moe, plan, row, buffers, n_local)
        works = self._post_paced(chunks, pacer)
        watch = _Watch(works, self.options.timeout_s, self.device.type == "cuda") if works else None
        return _Posted(row, staged, expected_N, received, watch, error or late)

    def _ops(self, moe, plan: ReshardPlan, row: int, buffers: SlotWeights, n_local: int):
        """This layer's transfers in plan order, in chunks of `chunk_experts` experts per peer (the
        same on both ends of a pair): ([[_Move]], uint8 views of the received rows). From a peer this
        process maps (copy engines), a receive is a pull and the peer posts no send."""
        S, size, ce = plan.topology.slots_per_gpu, self.options.chunk_experts, self.peer_copies
        sends, recvs = plan.sends_of(self.rank, row), plan.receives_of(self.rank, row)
        chunks: dict[int, list[_Move]] = {}
        received = []
        for kind, transfers in ((dist.isend, sends), (dist.irecv, recvs)):
            for peer in (int(p) for p in np.unique(transfers.peer_X)):
                pulled = ce is not None and ce.reaches(peer)  # both ways: same node, both mapped
                if kind is dist.isend and pulled:
                    continue  # the peer pulls it
                for k, x in enumerate(np.flatnonzero(transfers.peer_X == peer)):
                    chunk = chunks.setdefault(k // size, [])
                    if kind is dist.isend:
                        slot = moe.read_slot(int(transfers.src_slot_X[x]) % S)
                        chunk += [_Move(self._op(kind, t, peer), peer, 0, t.numel()) for t in slot.wire()]
                        continue
                    dst = buffers.row(n_local + int(x))
                    received.append(dst.wire()[0])
                    if pulled:
                        pull = (peer, row, int(transfers.src_slot_X[x]) % S, dst)
                        chunk.append(_Move(pull, peer, dst.nbytes, 0))
                    else:
                        chunk += [_Move(self._op(kind, t, peer), peer, t.numel(), 0) for t in dst.wire()]
        return [chunks[k] for k in sorted(chunks)], received

    def _op(self, kind, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(kind, tensor, peer, self.group)

    def _post_paced(self, chunks: list[list[_Move]], pacer: Pacer) -> list[tuple]:
        """Post each chunk once the rate limit allows (the larger of its bytes in and out): [(work, peer)]."""
        out = []
        for chunk in chunks:
            pacer.wait(max(sum(m.bytes_in for m in chunk), sum(m.bytes_out for m in chunk)))
            ops = [m for m in chunk if isinstance(m.op, dist.P2POp)]
            pulls = [m for m in chunk if not isinstance(m.op, dist.P2POp)]
            if pulls:
                out.append((self.peer_copies.pull([m.op for m in pulls]), sorted({m.peer for m in pulls})))
            if ops:
                works, peers = dist.batch_isend_irecv([m.op for m in ops]), [m.peer for m in ops]
                # gloo: one work per op (a late one names its peer); NCCL: one for the batch
                one_each = len(works) == len(peers)
                out += list(zip(works, peers)) if one_each else [(w, sorted(set(peers))) for w in works]
        return out

    def _handshake(self, peers: np.ndarray) -> str | None:
        if self.control is self.group or not len(peers):
            return None
        ops = [dist.P2POp(op, torch.zeros(1), int(p), self.control)
               for p in peers for op in (dist.isend, dist.irecv)]
        works = list(zip(dist.batch_isend_irecv(ops), [int(p) for p in peers for _ in range(2)]))
        return _Watch(works, self.options.timeout_s, cuda=False).join()

    # -- finish --------------------------------------------------------------------------------
    def _finish(self, plan: ReshardPlan, posted: _Posted, fault, handover) -> str | None:
        try:
            error = self._wait(posted) or posted.error
            if error is None:
                fault.after_receive(int(plan.layers[posted.row]), posted.received)
                error = self._verify(posted)
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the agreement
            error = f"rank {self.rank}: {exc}"
        error = self._agree(error)
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
        """5. one pass over the staged bytes; the host learns the verdict (this stream syncs)."""
        actual = expert_sums(posted.staged.buffers)
        expected = torch.as_tensor(posted.expected_N, device=actual.device)
        bad = (actual != expected).nonzero().flatten().tolist()
        if not bad:
            return None
        S = self.moe_layers[0].w13_SFD.shape[0]
        slot = int(posted.staged.dst_slot_N[bad[0]]) + self.rank * S
        return f"rank {self.rank}: checksum mismatch for slot {slot}"

    def _agree(self, error: str | None) -> str | None:
        """6. every rank learns whether all succeeded; the failing rank's message travels along."""
        device = self.device if self.control is self.group else "cpu"
        flag = torch.tensor([0 if error is None else self.rank + 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if int(flag) == 0:
            return None
        box = [error]
        dist.broadcast_object_list(box, src=int(flag) - 1, group=self.control)
        return box[0]


@dataclass(frozen=True)
class _Move:
    """One transfer of a chunk: a P2POp, or a pull (peer, layer row, peer's slot, destination)."""

    op: object
    peer: int
    bytes_in: int
    bytes_out: int


class _Watch:
    """Waits on a helper thread for works [(work, peer or peers)], noting when each completed, so a
    late one is judged by when it finished, not by when someone looked. join() -> why late, or None;
    raises what a work raised. gloo's works complete only in wait() (which blocks; its wait(timeout)
    would close the group), NCCL's are polled (their wait() only orders a stream)."""

    def __init__(self, works: list[tuple], timeout_s: float, cuda: bool) -> None:
        self.works, self.timeout_s, self.start, self.cuda = works, timeout_s, time.monotonic(), cuda
        self.done_at: list[float] = []
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._poll, name=f"{threading.current_thread().name}-watch",
                                       daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        try:
            for work, _ in self.works:
                while self.cuda and not work.is_completed():
                    time.sleep(0.0005)
                if not self.cuda:
                    work.wait()
                self.done_at.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - raised again by join, on the reshard thread
            self.failure.append(exc)

    def join(self) -> str | None:
        self.thread.join()
        if self.failure:
            raise self.failure[0]
        for (_, peer), at in zip(self.works, self.done_at):
            if at - self.start > self.timeout_s:
                late = [peer] if isinstance(peer, int) else peer
                who = f"rank {late[0]}" if len(late) == 1 else f"one of ranks {', '.join(map(str, late))}"
                return f"transfer timed out after {self.timeout_s:g} s waiting on {who}"
        return None


def _gather_slots(moe, src_S: np.ndarray, buffers: SlotWeights, n: int) -> None:
    """buffers rows [0, n) <- this rank's slots src_S, one gather per tensor (a device copy)."""
    if n == 0:
        return
    index = to_device(src_S, buffers.w13.device)
    for slots, out in zip(moe.read_slot(slice(None)).tensors(), buffers.tensors()):
        torch.index_select(as_words(slots), 0, index, out=as_words(out[:n]))


def _overlaps(plan: ReshardPlan, rows: list[int], expert_bytes: int, budget: int) -> list[bool]:
    """overlap[i]: rows[i + 1] is posted before rows[i] finishes, where both fit the staging budget
    on every rank (the plan decides, so all ranks run the same schedule)."""
    staging = plan.staging_slots_LG.max(axis=1) * expert_bytes
    return [bool(staging[a] + staging[b] <= budget) for a, b in zip(rows, rows[1:])] + [False]
