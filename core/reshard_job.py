"""`JobStatus`: what a server tells about one live reshard, the same typed value on both sides of HTTP.

The runtime's job registry (rank 0) keeps one per job and serves `to_json()` at
GET /moeplace/reshard/{id}; the client (`moeplace apply`, the demo, the benchmarks) reads it back
with `JobStatus.from_json`, which names the field and the value of anything malformed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum


class JobState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    DONE = "done"  # the new layout serves
    ROLLED_BACK = "rolled_back"  # a failure; the old layout serves again, never a mix
    FAILED = "failed"  # the rollback failed too

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.ROLLED_BACK, JobState.FAILED)


@dataclass(frozen=True)
class PhaseSeconds:
    """Where rank 0's reshard thread spent its time, summed over layers: staging (buffers, local copies,
    the send gathers), posting transfers (with the peers' handshake and the rate limit's pauses),
    waiting for the transfers, checking them (checksums and the layer's agreement), and waiting for
    the serving thread to install staged layers. Layers overlap: the sum may be less than the job's
    seconds, never more."""

    stage: float = 0.0
    post: float = 0.0
    transfer: float = 0.0
    check: float = 0.0
    swap_wait: float = 0.0

    def plus(self, phase: str, seconds: float) -> PhaseSeconds:
        values = asdict(self)
        values[phase] += seconds
        return PhaseSeconds(**values)


@dataclass(frozen=True, kw_only=True)
class JobStatus:
    """One reshard job: id, plan size (layers, experts and bytes crossing a link), progress, outcome.

    started: time.time() at submission; seconds: wall time from start to the final state (0 before);
    error: why it rolled back or failed (None otherwise); phase_seconds: rank 0's, as the job runs;
    rank_phase_seconds: every rank's (index = rank), set when the job ends: a slow rank shows there."""

    id: str
    layers_total: int
    experts_to_move: int
    bytes_to_move: int
    state: JobState = JobState.PENDING
    layers_done: int = 0
    experts_moved: int = 0
    bytes_moved: int = 0
    started: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    phase_seconds: PhaseSeconds = PhaseSeconds()
    rank_phase_seconds: tuple[PhaseSeconds, ...] = ()

    @property
    def bandwidth_gbps(self) -> float:
        """Bytes moved (all GPUs together) per second of the job, in GB/s; 0 before it ends."""
        return self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["state"] = self.state.value
        out["rank_phase_seconds"] = list(out["rank_phase_seconds"])
        out["bandwidth_gbps"] = self.bandwidth_gbps
        return out

    @classmethod
    def from_json(cls, data, source: str) -> JobStatus:
        """The inverse of `to_json`; ValueError naming `source` and the field for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a reshard status must be a JSON object, got {type(data).__name__}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"{source}: reshard status has no field {f.name!r}")
            values[f.name] = _field(f.name, data[f.name], source)
        return cls(**values)


_INTS = ("layers_total", "experts_to_move", "bytes_to_move", "layers_done", "experts_moved", "bytes_moved")


def _field(name: str, value, source: str):
    bad = lambda: ValueError(f"{source}: reshard status field {name!r} is invalid: {value!r}")  # noqa: E731
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad()
        return value
    if name in ("started", "seconds"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise bad()
        return float(value)
    if name == "state":
        try:
            return JobState(value)
        except ValueError:
            raise bad() from None
    if name == "phase_seconds":
        names = {f.name for f in fields(PhaseSeconds)}
        if not isinstance(value, dict) or set(value) != names:
            raise bad()
        return PhaseSeconds(**{k: _field("seconds", v, source) for k, v in value.items()})
    if name == "rank_phase_seconds":
        names = {f.name for f in fields(PhaseSeconds)}
        if not isinstance(value, list) or any(not isinstance(v, dict) or set(v) != names for v in value):
            raise bad()
        return tuple(_field("phase_seconds", v, source) for v in value)
    if name == "error":
        if value is not None and not isinstance(value, str):
            raise bad()
        return value
    if not isinstance(value, str):  # id
        raise bad()
    return value
