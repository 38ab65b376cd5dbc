"""Live reshard: run a `ReshardPlan` on the serving model, layer by layer, while it keeps serving.

Each rank runs the plan in a worker thread on a group of its own (gloo on CPU, NCCL on GPU), so
transfers never wait for serving steps and steps never wait for transfers. On GPUs the agreements
travel on a gloo group of their own (`control`), and each layer's transfers start with a handshake
on it, so a rank waiting for a late peer waits on the host (NCCL kernels left spinning for seconds
beside the serving ones hung serving once on 4 GPUs). Only writing a staged layer into its slots and
swapping its routing table happen on the serving thread, between two steps, one layer per step
boundary: no step is held up longer than one layer's swap.

Per layer row (numbers as in the plan's execution contract, runtime/reshard_plan.py):
  1. stage: LOCAL copies and this rank's outgoing experts are read from the old slots (weights and
     their weight_scale_inv together) and checksummed;
     agree: every rank all-reduces "prepared"; one failure makes all skip the transfer;
  2. transfer: one batch_isend_irecv per rank, per peer one uint8 buffer (its experts in plan order)
     plus their checksums, waited on with a timeout (`timeout_s`, MOEPLACE_RESHARD_TIMEOUT seconds,
     60 by default); every received expert's checksum is verified;
     agree: every rank all-reduces "staged";
  3.+4. the serving thread writes the staged experts into their slots and swaps the layer's table at
     the next step boundary; the worker waits for that before staging the next layer, so a rank stages
     at most one layer: `ReshardPlan.staging_slots_LG[l, rank]` experts.
Any failure (an exception on a rank, a transfer past its timeout, a checksum mismatch) stops every
rank at the next agreement; layers already swapped are moved back with the reverse plan and swapped
back, so the old layout serves again, never a mix. The job then reports "rolled_back" and why.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import Placement
from moeplace.runtime.control import ReshardAction, StartReshard, SwapLayer
from moeplace.runtime.reshard_plan import Link, ReshardPlan, plan_reshard
from moeplace.runtime.reshard_wire import SLOT_TENSORS, checksums, pack, unpack



@dataclass
class JobStatus:
    """Rank 0's record of one reshard, served by GET /moeplace/reshard/{id}."""

    id: str
    layers_total: int
    experts_to_move: int
    bytes_to_move: int
    state: str = "pending"  # pending | running | done | rolling_back | rolled_back | failed
    layers_done: int = 0
    experts_moved: int = 0
    bytes_moved: int = 0
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    error: str | None = None
    # where rank 0's time went, summed over layers: staging local copies, transfers with their
    # checksums (each with its all-rank agreement), and waiting for the serving thread's swap
    phase_seconds: dict = field(default_factory=lambda: {"stage": 0.0, "transfer": 0.0, "swap_wait": 0.0})

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["bandwidth_gbps"] = self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return out


class ReshardBusy(Exception):
    """A reshard is already running (HTTP 409)."""


class Resharder:
    """One per rank. Rank 0 also keeps the jobs and decides when layers swap (`due_actions`)."""

    def __init__(self, model, group, rank: int, timeout_s: float | None = None, fault: str | None = None,
                 control=None) -> None:
        # `group` moves the experts; `control` (gloo, the same ranks; default: `group`) carries the
        # agreements and, when it is not `group`, a handshake before each layer's transfers.
        self.model, self.group, self.rank = model, group, rank
        self.control = control if control is not None else group
        self.timeout_s = timeout_s if timeout_s is not None else _timeout_from_env()
        self.expert_bytes = pack(model.moe_layers[0], 0).numel()  # weights + scales of one expert
        self.device = model.moe_layers[0].w13_SFD.device
        # Fault injection for tests: "corrupt:LAYER" flips a byte in every send of that layer,
        # "fail:LAYER:RANK" makes that rank raise while staging it, "stall:LAYER:RANK" makes that rank
        # post its transfers of that layer 2 x timeout_s late (its peers' waits time out);
        # comma-separated, one per job in order.
        spec = fault if fault is not None else os.environ.get("MOEPLACE_FAULT", "")
        self.faults = [f for f in spec.split(",") if f]
        self._started = 0
        self.jobs: dict[str, JobStatus] = {}
        self._actions: queue.Queue = queue.Queue()  # rank 0: broadcast with the next step
        self._swapped = threading.Semaphore(0)  # worker waits for its layer's swap
        self._staged: dict[int, dict[int, list[torch.Tensor]]] = {}  # row -> local dst slot -> tensors
        self._phy2log = model.placement.phy2log_LP.copy()  # what each layer row serves now
        self._active: str | None = None
        self._lock = threading.Lock()

    def connect(self, nbytes: int = 4 << 20) -> None:
        """Open the transfer connections to every other rank now, all ranks together (a collective).
        NCCL creates a pair's point-to-point connection on its first transfer: without this the first
        reshard would pay for every pair's setup in the middle of serving."""
        world = dist.get_world_size(self.group)
        ops = []
        for peer in (p for p in range(world) if p != self.rank):
            send = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            ops += [dist.P2POp(dist.isend, send, peer, self.group),
                    dist.P2POp(dist.irecv, torch.empty_like(send), peer, self.group)]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- rank 0: requests ----------------------------------------------------------------------
    def submit(self, new: Placement) -> JobStatus:
        """Validate and plan (ValueError for a placement that does not fit), then queue the start."""
        plan = plan_reshard(self.model.placement, new)
        with self._lock:
            if self._active is not None:
                raise ReshardBusy(f"reshard {self._active} is still running")
            moved = int(plan.experts_moved_L.sum())
            job = JobStatus(uuid.uuid4().hex[:12], plan.num_layers, moved, moved * self.expert_bytes)
            self.jobs[job.id] = job
            self._active = job.id
        self._actions.put(StartReshard(job.id, new, plan))
        return job

    def due_actions(self) -> list[ReshardAction]:
        """Rank 0's serving loop broadcasts these with its next step (or an idle tick)."""
        out = []
        while True:
            try:
                out.append(self._actions.get_nowait())
            except queue.Empty:
                return out

    # -- every rank: actions from the step broadcast (serving thread, between steps) -----------
    def apply(self, action: ReshardAction) -> None:
        match action:
            case StartReshard(job_id=job_id, new=new, plan=plan):
                fault = self.faults[self._started] if self._started < len(self.faults) else None
                self._started += 1
                threading.Thread(target=self._run, args=(job_id, new, plan, fault), name=f"reshard-{job_id}",
                                 daemon=True).start()
            case SwapLayer(row=row, phy2log_P=phy2log_P):
                self._swap(row, phy2log_P)
                self._swapped.release()

    def _swap(self, row: int, new_row_P: np.ndarray) -> None:
        """Steps 3 and 4 of one layer: staged experts into their slots, then the routing table."""
        moe = self.model.moe_layers[row]
        moe.fold_window()  # the window's per-slot counts so far belong to the old layout's experts
        staged = self._staged.pop(row, {})
        for slot, tensors in staged.items():
            for name, value in zip(SLOT_TENSORS, tensors):
                getattr(moe, name)[slot].copy_(value)
        self._phy2log[row] = new_row_P
        current = _with_rows(self.model.placement, self._phy2log)
        moe.use_layout(current)  # in place: CUDA graphs that captured the layer stay valid

    # -- every rank: the worker thread ---------------------------------------------------------
    def _run(self, job_id: str, new: Placement, plan: ReshardPlan, fault: str | None) -> None:
        job = self.jobs.get(job_id)
        old = self.model.placement
        start = time.monotonic()
        if job is not None:
            job.state = "running"
        done_rows: list[int] = []
        error = self._execute(plan, new.phy2log_LP, done_rows, job, fault)
        if error is None:
            self.model.placement = new
        else:
            # Rank 0 plans the way back and sends it: every rank must post the same transfers, and
            # the planner's tie-breaking is not promised to be the same in every process.
            box = [plan_reshard(_with_rows(old, self._phy2log), old) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            back = box[0]
            if job is not None:
                job.state, job.error = "rolling_back", error
            second = self._execute(back, old.phy2log_LP, [], None, None)
            if second is not None:
                error += f"; rollback failed too: {second}"
        if job is not None:
            job.seconds = time.monotonic() - start
            job.state = "done" if error is None else ("rolled_back" if "rollback failed" not in error else "failed")
            with self._lock:
                self._active = None

    def _execute(self, plan: ReshardPlan, target_LP: np.ndarray, done_rows: list, job, fault: str | None) -> str | None:
        """Run every layer of `plan`; None on success, else the first failure (after all ranks agreed)."""
        if self.device.type != "cuda":
            return self._execute_layers(plan, target_LP, done_rows, job, fault)
        # Copies and transfers on a side stream: serving kernels on the default stream never queue
        # behind them (NCCL's own streams carry the bytes).
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            return self._execute_layers(plan, target_LP, done_rows, job, fault)

    def _execute_layers(self, plan: ReshardPlan, target_LP: np.ndarray, done_rows: list, job, fault) -> str | None:
        for row in range(plan.num_layers):
            if not len(plan.layer_X) or not (plan.layer_X == row).any():
                continue
            lap = _Laps(job.phase_seconds if job is not None else {})
            error = self._agree(self._stage(plan, row, fault))
            lap("stage")
            if error is None:
                error = self._agree(self._transfer(plan, row, fault))
                lap("transfer")
            if error is not None:
                self._staged.pop(row, None)
                return f"layer {int(plan.layers[row])}: {error}"
            if self.rank == 0:
                self._actions.put(SwapLayer(row, target_LP[row]))
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # staged copies done before the swap reads them
            self._swapped.acquire()  # the serving thread has swapped this layer
            lap("swap_wait")
            done_rows.append(row)
            if job is not None:
                job.layers_done += 1
                job.experts_moved += int(plan.experts_moved_L[row])
                job.bytes_moved += int(plan.experts_moved_L[row]) * self.expert_bytes
        return None

    def _stage(self, plan: ReshardPlan, row: int, fault: str | None) -> str | None:
        """Step 1: LOCAL copies of this rank into staging, read from the untouched old slots."""
        try:
            if fault == f"fail:{int(plan.layers[row])}:{self.rank}":
                raise RuntimeError(f"injected failure on rank {self.rank}")
            moe, S = self.model.moe_layers[row], plan.topology.slots_per_gpu
            staged = self._staged.setdefault(row, {})
            copies = plan.copies_of(self.rank, row)
            for src, dst, kind in zip(copies.src_slot_X, copies.dst_slot_X, copies.kind_X):
                if kind == Link.LOCAL:
                    staged[int(dst) % S] = [getattr(moe, n)[int(src) % S].clone() for n in SLOT_TENSORS]
            return None
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the agreement
            return f"rank {self.rank}: {exc}"

    def _transfer(self, plan: ReshardPlan, row: int, fault: str | None) -> str | None:
        """Step 2: sends from old slots, receives into staging, checksums verified."""
        try:
            moe, S = self.model.moe_layers[row], plan.topology.slots_per_gpu
            sends, recvs = plan.sends_of(self.rank, row), plan.receives_of(self.rank, row)
            ops, peers, inbound = [], [], []  # peers[i]: the other end of ops[i]
            for peer in np.unique(sends.peer_X):
                payload = torch.cat([pack(moe, int(s)) for s in sends.src_slot_X[sends.peer_X == peer] % S])
                sums = checksums(payload, self.expert_bytes)
                if fault == f"corrupt:{int(plan.layers[row])}":
                    payload[len(payload) // 2] ^= 0x5A  # a byte flipped on the wire
                ops += [dist.P2POp(dist.isend, payload, int(peer), self.group), dist.P2POp(dist.isend, sums, int(peer), self.group)]
                peers += [int(peer)] * 2
            size = pack(moe, 0).numel()
            for peer in np.unique(recvs.peer_X):
                dst = recvs.dst_slot_X[recvs.peer_X == peer] % S
                payload = torch.empty(len(dst) * size, dtype=torch.uint8, device=self.device)
                sums = torch.empty(len(dst), dtype=torch.int64, device=self.device)
                ops += [dist.P2POp(dist.irecv, payload, int(peer), self.group), dist.P2POp(dist.irecv, sums, int(peer), self.group)]
                peers += [int(peer)] * 2
                inbound.append((dst, payload, sums))
            if fault == f"stall:{int(plan.layers[row])}:{self.rank}":
                time.sleep(2 * self.timeout_s)  # posted late: every peer's wait on this rank times out first
            late = None
            if ops and self.control is not self.group:
                # Meet each peer on the host first: NCCL kernels then start together, and a late peer is
                # waited for here, and named (gloo returns a work per op), not by kernels on the GPU.
                met = sorted(set(peers))
                hello = [dist.P2POp(op, torch.zeros(1), p, self.control)
                         for p in met for op in (dist.isend, dist.irecv)]
                late = self._post_and_wait(hello, [p for p in met for _ in range(2)])
            # Posted even after a late handshake: what one rank posts, its peers must match.
            moved_late = self._post_and_wait(ops, peers) if ops else None
            if late or moved_late:
                return f"rank {self.rank}: {late or moved_late}"
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # received bytes are complete before use
            staged = self._staged.setdefault(row, {})
            for dst, payload, sums in inbound:
                bad = (checksums(payload, size) != sums).nonzero().flatten().tolist()  # one host sync per peer
                if bad:
                    return f"rank {self.rank}: checksum mismatch for slot {int(dst[bad[0]]) + self.rank * S}"
                for i, slot in enumerate(dst):
                    staged[int(slot)] = unpack(moe, payload[i * size: (i + 1) * size])
            for src, dst, kind in zip(*(plan.copies_of(self.rank, row).__dict__[k] for k in ("src_slot_X", "dst_slot_X", "kind_X"))):
                if kind == Link.LOCAL_FROM_RECEIVED:
                    staged[int(dst) % S] = [t.clone() for t in staged[int(src) % S]]
            return None
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the agreement
            return f"rank {self.rank}: {exc}"

    def _post_and_wait(self, ops: list, peers: list[int]) -> str | None:
        """Post `ops` and wait for all of them: None when they completed within timeout_s, else why not.

        A helper thread posts and waits; this thread waits for it with the timeout. A late transfer is
        waited out, never abandoned: gloo's own wait(timeout) closes every connection of the group when
        it expires (NCCL's aborts the communicator), and an op left pending would match the next layer's
        transfers. So a late peer costs its delay, but the group stays usable for the agreement, the
        rollback and the next job. A peer that never posts is beyond this: the group's own timeout
        (gloo) or watchdog (NCCL) ends that wait."""
        works, done, failure = [], [], []
        stream = torch.cuda.current_stream(self.device) if ops[0].tensor.is_cuda else None

        def post_and_wait() -> None:
            try:
                if stream is not None:
                    torch.cuda.set_device(self.device)  # batch_isend_irecv on NCCL needs it on every thread
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    works.extend(dist.batch_isend_irecv(ops))
                    for work in works:
                        while stream is not None and not work.is_completed():
                            time.sleep(0.001)  # NCCL's wait() only orders the stream; the host must poll
                        work.wait()  # gloo: blocks until done; NCCL: the side stream waits for it
                        done.append(work)
            except Exception as exc:  # noqa: BLE001 - raised again on the calling thread
                failure.append(exc)

        name = f"{threading.current_thread().name}-transfer"
        waiter = threading.Thread(target=post_and_wait, name=name, daemon=True)
        waiter.start()
        waiter.join(self.timeout_s)
        in_time, first_pending = not waiter.is_alive(), len(done)
        waiter.join()
        if failure:
            raise failure[0]
        if in_time:
            return None
        # gloo returns one work per op, waited in order: the first unfinished one names the late peer.
        # NCCL returns one work for the whole batch: any of its peers may be the late one.
        late = (peers[first_pending:first_pending + 1] if len(works) == len(ops) else []) or sorted(set(peers))
        who = f"rank {late[0]}" if len(late) == 1 else f"one of ranks {', '.join(map(str, late))}"
        return f"transfer timed out after {self.timeout_s:g} s waiting on {who}"

    def _agree(self, error: str | None) -> str | None:
        """All ranks learn whether every rank succeeded; the failing rank's message travels along."""
        device = self.device if self.control is self.group else "cpu"
        flag = torch.tensor([0 if error is None else self.rank + 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if int(flag) == 0:
            return None
        box = [error]
        dist.broadcast_object_list(box, src=int(flag) - 1, group=self.control)
        return box[0]


def _timeout_from_env() -> float:
    raw = os.environ.get("MOEPLACE_RESHARD_TIMEOUT", "60")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"MOEPLACE_RESHARD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return seconds


class _Laps:
    """Adds the seconds since the previous lap to `totals[phase]`."""

    def __init__(self, totals: dict) -> None:
        self.totals, self.last = totals, time.monotonic()

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        if phase in self.totals:
            self.totals[phase] += now - self.last
        self.last = now


def _with_rows(placement: Placement, phy2log_LP: np.ndarray) -> Placement:
    return Placement(phy2log_LP.copy(), placement.num_experts, placement.topology, placement.layers,
                     placement.num_model_layers, None, placement.provenance, placement.source)
