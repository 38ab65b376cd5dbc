"""Rank 0's registry of reshard jobs: one `JobStatus` per job, at most one job running; and `Laps`,
where each rank's reshard thread spends a job's time.

The HTTP handlers read the registry (`get`, `all`), the reshard thread and the serving thread update
it (`update`, `add_phase`, `finish`); each update replaces the frozen record under a lock, so a
reader always sees one consistent record.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass

from moeplace.reshard_job import JobState, JobStatus, PhaseSeconds


@dataclass(frozen=True)
class Lap:
    """One phase of one layer row ended on a rank's reshard thread, `at_s` seconds into the job
    (row -1: not a layer's, e.g. the final wait for installs), after `cpu_s` seconds of the thread's
    CPU time: a stretch of wall time without CPU time is a wait (the GIL, a lock, a sleep), one with it
    is work (Python, or driver calls). Phases as in `PhaseSeconds`."""

    row: int
    phase: str
    at_s: float
    cpu_s: float


class ReshardBusy(Exception):
    """A reshard is already running (HTTP 409)."""


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus] = {}
        self._active: str | None = None
        self._lock = threading.Lock()

    def open(self, layers: int, experts: int, expert_bytes: int) -> JobStatus:
        """A new pending job; ReshardBusy while another has not reached a final state."""
        with self._lock:
            if self._active is not None:
                raise ReshardBusy(f"reshard {self._active} is still running")
            job = JobStatus(id=uuid.uuid4().hex[:12], layers_total=int(layers), experts_to_move=int(experts),
                            bytes_to_move=int(experts) * int(expert_bytes), started=time.time())
            self._jobs[job.id] = job
            self._active = job.id
            return job

    def get(self, job_id: str) -> JobStatus | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[JobStatus]:
        with self._lock:
            return list(self._jobs.values())

    def update(self, job_id: str, **changes) -> None:
        with self._lock:
            self._jobs[job_id] = dataclasses.replace(self._jobs[job_id], **changes)

    def add_layer(self, job_id: str, experts: int, expert_bytes: int) -> None:
        """One more layer installed, which moved `experts` across a link."""
        experts = int(experts)  # a numpy count would not serialise to JSON
        with self._lock:
            job = self._jobs[job_id]
            self._jobs[job_id] = dataclasses.replace(
                job, layers_done=job.layers_done + 1, experts_moved=job.experts_moved + experts,
                bytes_moved=job.bytes_moved + experts * expert_bytes)

    def add_phase(self, job_id: str, phase: str, seconds: float) -> None:
        with self._lock:
            job = self._jobs[job_id]
            self._jobs[job_id] = dataclasses.replace(job, phase_seconds=job.phase_seconds.plus(phase, seconds))

    def finish(self, job_id: str, state: JobState, seconds: float, error: str | None) -> None:
        assert state.final, state
        with self._lock:
            self._jobs[job_id] = dataclasses.replace(self._jobs[job_id], state=state, seconds=seconds, error=error)
            self._active = None


class Laps:
    """Where this rank's reshard thread spends a job's time: seconds per phase and the timeline of
    `Lap`s (when each phase of each layer row ended); on rank 0 each lap is also added to the job as
    it goes (job_id None: not added, e.g. a rollback's)."""

    def __init__(self, jobs: JobRegistry, job_id: str | None) -> None:
        self.jobs, self.job_id = jobs, job_id
        self.began = self.last = time.monotonic()
        self.began_cpu = time.thread_time()
        self.phases = PhaseSeconds()
        self.timeline: list[Lap] = []

    def __call__(self, phase: str, row: int = -1) -> None:
        now = time.monotonic()
        self.phases = self.phases.plus(phase, now - self.last)
        self.timeline.append(Lap(row, phase, now - self.began, time.thread_time() - self.began_cpu))
        if self.job_id is not None:
            self.jobs.add_phase(self.job_id, phase, now - self.last)
        self.last = now

    def mark(self, point: str, row: int) -> None:
        """A point within a phase, in the timeline only (where a long phase spends its time)."""
        self.timeline.append(Lap(row, point, time.monotonic() - self.began, time.thread_time() - self.began_cpu))
