"""Live reshard: run a `ReshardPlan` on the serving model while it keeps serving.

Three parts, one per responsibility:
- rank 0's `JobRegistry` (runtime/reshard_jobs.py): the jobs and their typed `JobStatus`, the same
  value the HTTP client reads back;
- each rank's `LayerMover` (runtime/reshard_mover.py): on a thread of its own and a group of its own
  (gloo on CPU, NCCL on GPU; agreements on a gloo `control` group), stages, transfers, verifies and
  agrees layer after layer, several layers in flight within a staging budget;
- the `Resharder` here: turns requests into actions that rank 0 broadcasts with the serving steps
  (`StartReshard`, `SwapLayer`: runtime/control.py), hands staged layers from the mover to the serving thread,
  which installs them between two steps (`EPMoE.install`: in-place copies, then the routing table;
  one layer per step boundary under a rate limit), and rolls back on failure.
Any failure (an exception on a rank, a transfer past its timeout, a checksum mismatch) stops every
rank at the layer's agreement; layers already installed are moved back with the reverse plan, so the
old layout serves again, never a mix. The job then reports "rolled_back" and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import Placement
from moeplace.runtime.control import ReshardAction, StartReshard, SwapLayer
from moeplace.reshard_job import JobState, JobStatus
from moeplace.runtime.reshard_faults import NO_FAULTS, FaultPlan
from moeplace.runtime.reshard_handover import Handover
from moeplace.runtime.reshard_ipc import PeerCopies, Spent, share_slots
from moeplace.runtime.reshard_jobs import JobRegistry, Lap, Laps, ReshardBusy  # noqa: F401 - ReshardBusy: the server's 409
from moeplace.runtime.reshard_mover import LayerMover
from moeplace.runtime.reshard_options import DEFAULT_STAGING, ReshardOptions, default_staging
from moeplace.runtime.reshard_plan import ReshardPlan, plan_reshard
from moeplace.runtime.reshard_wire import ChecksumTable


# The interpreter's thread switch interval while a reshard runs (default 5 ms): every torch call of the
# reshard thread gives the GIL up and may wait this long to get it back from a serving thread running
# Python. 0.1 ms did not shorten a layer's stage in the full loop and lengthened serving steps during
# the reshard (BENCHMARKS.md, live reshard, 2026-11-30 17:20): 0.5 ms.
GIL_SWITCH_S = 0.0005


class Resharder:
    """One per rank. `connect` (a collective) before the first job; rank 0 also keeps the jobs."""

    def __init__(self, model, group, rank: int, control=None, options: ReshardOptions | None = None,
                 faults: FaultPlan | None = None) -> None:
        # `group` moves the experts; `control` (gloo, the same ranks; default: `group`) carries the
        # agreements and, when it is not `group`, a handshake before each layer's transfers.
        self.model, self.group, self.rank = model, group, rank
        self.control = control if control is not None else group
        self.options = options if options is not None else ReshardOptions.from_env()
        self.faults = faults if faults is not None else FaultPlan()
        self.device = model.moe_layers[0].w13_SFD.device
        self.expert_bytes = model.moe_layers[0].read_slot(0).nbytes  # weights + scales of one expert
        self.jobs = JobRegistry()
        self.mover: LayerMover | None = None
        self._started = 0
        self.wake = lambda: None  # the serving loop's: called when an action is due
        self._actions: deque = deque()  # rank 0: broadcast with the next step (append/popleft: thread-safe)
        self._phy2log = model.placement.phy2log_LP.copy()  # what each layer row serves now
        self._auto_staging = self.options.staging_bytes is None  # sized here, not by the operator
        if self._auto_staging:
            S = model.moe_layers[0].w13_SFD.shape[0]
            self.options = dataclasses.replace(self.options, staging_bytes=default_staging(S, self.expert_bytes))
        self._handover = Handover(self.options.staging_bytes, self._on_commit)
        self._stream = None  # the reshard thread's CUDA stream (`_on_reshard_stream`)
        self._crash: BaseException | None = None  # what ended the reshard thread, where no agreement could
        # the running execution (reshard thread sets, serving thread reads): its job (None: a rollback,
        # whose moves the job does not count), experts moved per layer row, and target layout
        self._job: str | None = None
        self._moved_L: np.ndarray | None = None
        self._target: Placement | None = None
        self.timeline: tuple[Lap, ...] = ()  # this rank's laps of its last job's way there (benchmarks)

    def connect(self, nbytes: int = 4 << 20) -> None:
        """All ranks together: share the experts' checksums, and open the transfer connections to every
        other rank now (NCCL creates a pair's connection on its first transfer: without this the first
        reshard would pay every pair's setup in the middle of serving)."""
        world, gather = dist.get_world_size(self.group), self._gather
        no_room = [e for e in gather(self._reserve_staging()) if e]
        if no_room and self._auto_staging and self.options.staging_bytes > DEFAULT_STAGING:
            # the default grown past 8 GiB does not fit on some rank: every rank takes 8 GiB (the budget
            # must be the same everywhere: the layers' schedule depends on it), the larger block released
            self.options = dataclasses.replace(self.options, staging_bytes=DEFAULT_STAGING)
            self._handover = Handover(self.options.staging_bytes, self._on_commit)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            no_room = [e for e in gather(self._reserve_staging()) if e]
        if no_room:  # on every rank alike (a rank raising alone would leave the others in a collective)
            raise ValueError(no_room[0])
        layers = self.model.moe_layers
        checksums = ChecksumTable.gather(layers, self._phy2log, self.model.placement.num_experts, gather)
        peer_copies = None
        if self.options.copy_engine and self.device.type == "cuda":
            shared = gather(share_slots(layers))
            per_node = self.model.placement.topology.gpus_per_node
            peers = [p for p in range(world) if p != self.rank and p // per_node == self.rank // per_node]
            peer_copies = PeerCopies.open(self.device, {p: shared[p] for p in peers}, self.options.copy_streams,
                                          self.options.copy_batch, self.options.stream_priority)
        self.mover = LayerMover(layers, self.group, self.control, self.rank, self.options, checksums, peer_copies)
        with self._on_reshard_stream():
            self.mover.warm_up()
        ops = []
        for peer in (p for p in range(world) if p != self.rank):
            send = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            ops += [dist.P2POp(dist.isend, send, peer, self.group),
                    dist.P2POp(dist.irecv, torch.empty_like(send), peer, self.group)]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the warm-up's buffers are freed only after it ran

    def _reserve_staging(self) -> str | None:
        """On a GPU, the staging budget is allocated once now on the reshard stream and freed: it stays in
        that stream's cache, and a job's staging is carved from it. A cudaMalloc during a job would wait
        behind the serving stream's queued work (device allocations are synchronizing). Why not, if it
        does not fit."""
        if self.device.type != "cuda":
            return None
        try:
            with self._on_reshard_stream():
                torch.empty(self.options.staging_bytes, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError:
            free = torch.cuda.mem_get_info(self.device)[0]
            return (f"MOEPLACE_RESHARD_STAGING: the reshard staging budget of {self.options.staging_bytes} bytes "
                    f"does not fit on rank {self.rank}'s GPU ({free} bytes free after loading the model)")
        return None

    def _gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (a collective on the control group)."""
        out = [None] * dist.get_world_size(self.control)
        dist.all_gather_object(out, obj, group=self.control)
        return out

    @contextlib.contextmanager
    def _on_reshard_stream(self):
        """On a GPU, this thread's work on the reshard stream: copies and transfers on a side stream, so
        serving kernels on the default stream never queue behind them (NCCL's own streams carry the
        bytes). One stream for every job: the caching allocator reuses a block only on the stream that
        freed it, so the staging a job frees is the next job's without a cudaMalloc."""
        if self.device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device, self.options.stream_priority)
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self._stream):
            yield

    # -- rank 0: requests ----------------------------------------------------------------------
    def submit(self, new: Placement) -> JobStatus:
        """Validate and plan (ValueError for a placement that does not fit), then queue the start."""
        plan = plan_reshard(self.model.placement, new)
        job = self.jobs.open(plan.num_layers, int(plan.experts_moved_L.sum()), self.expert_bytes)
        self._actions.append(StartReshard(job.id, new, plan))
        self.wake()
        return job

    def due_actions(self) -> list[ReshardAction]:
        """Rank 0's serving loop broadcasts these with its next step (or an idle tick). Under a rate limit
        at most one layer swap per step, so no step waits for more than one layer's install; unlimited,
        every layer staged by then (the reshard ends sooner, a step may wait for several installs)."""
        out, one = [], self.options.rate_bytes_per_s > 0
        while self._actions:
            if one and isinstance(self._actions[0], SwapLayer) and any(isinstance(a, SwapLayer) for a in out):
                break
            out.append(self._actions.popleft())
        return out

    def _on_commit(self, row: int, phy2log_P: np.ndarray) -> None:
        """A layer agreed by every rank: rank 0 swaps it at a step boundary (`due_actions`)."""
        if self.rank == 0:
            self._actions.append(SwapLayer(row, phy2log_P))
            self.wake()

    # -- every rank: actions from the step broadcast (serving thread, between steps) -----------
    def apply(self, action: ReshardAction) -> None:
        match action:
            case StartReshard():
                assert self.mover is not None, "Resharder.connect() was not called"
                fault = self.faults.for_job(self._started)
                self._started += 1
                threading.Thread(target=self._run, args=(action, fault), name=f"reshard-{action.job_id}",
                                 daemon=True).start()
            case SwapLayer(row=row, phy2log_P=phy2log_P):
                self._install(row, phy2log_P)
            case _:
                raise AssertionError(f"unknown reshard action {action!r}")

    def _install(self, row: int, phy2log_P: np.ndarray) -> None:
        """Staged experts into their slots and the layer's new routing, between two steps."""
        staged = self._handover.take(row)
        assert np.array_equal(staged.phy2log_P, phy2log_P), (row, staged.phy2log_P, phy2log_P)
        self._phy2log[row] = staged.phy2log_P
        self.model.moe_layers[row].install(staged, self._target)  # the target's split_LP too
        if self._job is not None and self.rank == 0:
            self.jobs.add_layer(self._job, self._moved_L[row], self.expert_bytes)
        self._handover.installed(row)

    # -- every rank: the reshard thread --------------------------------------------------------
    def _run(self, start: StartReshard, fault) -> None:
        job_id, plan = start.job_id, start.plan
        old, began = self.model.placement, time.monotonic()
        if self.rank == 0:
            self.jobs.update(job_id, state=JobState.RUNNING)
        self._job, self._moved_L, self._target = job_id, plan.experts_moved_L, start.new
        # The serving thread runs Python for much of a step; at the default 5 ms switch interval each
        # wake-up of this thread (a wait done, ~10 a layer) could wait that long for the GIL.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_S))
        try:
            self._run_job(start, fault, old, began)
        except BaseException as exc:
            # Not a fault the agreement covers (those roll back): a bug, after which the ranks may be out
            # of step. The job ends failed, and the serving thread stops the server at its next step
            # (`raise_if_crashed`) rather than serving on with a layout no rank can vouch for.
            self._crash = exc
            if self.rank == 0:
                self.jobs.finish(job_id, JobState.FAILED, time.monotonic() - began, f"rank 0: {exc!r}")
            raise
        finally:
            sys.setswitchinterval(switch)

    def raise_if_crashed(self) -> None:
        """The serving thread's check, every step on every rank: a crashed reshard thread ends the rank."""
        if self._crash is not None:
            raise RuntimeError(f"the reshard thread of rank {self.rank} failed: {self._crash!r}") from self._crash

    def _run_job(self, start: StartReshard, fault, old: Placement, began: float) -> None:
        job_id, plan = start.job_id, start.plan
        laps = Laps(self.jobs, job_id if self.rank == 0 else None)
        error = self._execute(plan, start.new.phy2log_LP, fault, laps)
        if error is None:
            self.model.placement = start.new
        else:
            # Rank 0 plans the way back and sends it: every rank must post the same transfers, and
            # the planner's tie-breaking is not promised to be the same in every process.
            box = [plan_reshard(_with_rows(old, self._phy2log), old) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            if self.rank == 0:
                self.jobs.update(job_id, state=JobState.ROLLING_BACK, error=error)
            self._job, self._target = None, old  # the job counts the moves of the way there only
            second = self._execute(box[0], old.phy2log_LP, NO_FAULTS, Laps(self.jobs, None))
            if second is not None:
                error += f"; rollback failed too: {second}"
        seconds = time.monotonic() - began  # before the gather below: the job's own time
        self._job, self.timeline = None, tuple(laps.timeline)
        # one line per rank and job in the server's log: where each layer's time went (ms since start,
        # wall / the thread's CPU); one write (print writes the newline apart): the ranks share the log
        copies = self.mover.peer_copies
        sys.stderr.write(f"reshard {job_id} rank {self.rank} laps (ms, wall/cpu): " + " ".join(
            f"{lap.row}:{lap.phase}@{1e3 * lap.at_s:.1f}/{1e3 * lap.cpu_s:.1f}" for lap in laps.timeline) + "\n"
            + (f"reshard {job_id} rank {self.rank} pulls (ms, wall/cpu): {copies.spent.line()}\n" if copies else ""))
        if copies:
            copies.spent = Spent()
        sys.stderr.flush()
        rank_phases = tuple(self._gather(laps.phases))  # the job's way there, on every rank
        if self.rank == 0:
            self.jobs.update(job_id, rank_phase_seconds=rank_phases)
            state = JobState.DONE if error is None else (
                JobState.FAILED if "rollback failed" in error else JobState.ROLLED_BACK)
            self.jobs.finish(job_id, state, seconds, error)

    def _execute(self, plan: ReshardPlan, target_LP: np.ndarray, fault, laps: Laps) -> str | None:
        """Every layer of `plan`, then wait until all staged layers are installed."""
        with self._on_reshard_stream():
            error = self.mover.run(plan, target_LP, fault, self._handover, laps)
        self._handover.wait_all_installed()
        laps("swap_wait")
        return error


def _with_rows(placement: Placement, phy2log_LP: np.ndarray) -> Placement:
    return Placement(phy2log_LP.copy(), placement.num_experts, placement.topology, placement.layers,
                     placement.num_model_layers, None, placement.provenance, placement.source)
