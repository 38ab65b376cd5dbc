"""What one `EPMoE` step gives back (`MoEOutput`, its `Traffic`) and how a benchmark times its phases
(`PhaseTimer`; `_no_lap` when untimed).

Separate from runtime/moe.py, the layer itself, because these values leave the layer: the forward pass
collects them (runtime/forward.py), benchmarks read them. Legend as in runtime/moe.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class PhaseTimer:
    """Time between consecutive `lap`s of MoE steps, per phase name: CUDA events on a GPU (no host
    sync until `read`), the host clock on CPU. `start` before each step; `read` sums over the steps."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.laps: list[tuple[str, object, object]] = []
        self._last = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._last = self._now()

    def lap(self, phase: str) -> None:
        assert self._last is not None, "PhaseTimer.lap before start"
        now = self._now()
        self.laps.append((phase, self._last, now))
        self._last = now

    def read(self) -> dict[str, float]:
        """{phase: milliseconds summed over the laps recorded}; clears the laps."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for phase, a, b in self.laps:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[phase] = out.get(phase, 0.0) + ms
        self.laps, self._last = [], None
        return out


@dataclass(frozen=True)
class MoEOutput:
    """One MoE layer's step on this rank: y_TD [T, D] its output; ids_TK int64 [T', K] the logical experts
    the tokens this rank routed selected (the profiler's per-token samples); traffic: what moved."""

    y_TD: torch.Tensor
    ids_TK: torch.Tensor
    traffic: Traffic


@dataclass(frozen=True)
class Traffic:
    """Rows (one per token and destination) and assignments (one per token and expert) this rank sent to and
    received from each rank in one step; bytes of a dispatched row and of a result row."""

    send_rows: list[int]
    send_assignments: list[int]
    recv_rows: list[int]
    recv_assignments: list[int]
    row_bytes: int
    result_bytes: int

    def off_rank_bytes(self, rank: int) -> tuple[int, int]:
        """(dispatch, combine) bytes across this rank's links: the larger of out and in, its own rows left out."""
        off = lambda counts: sum(counts) - counts[rank]  # noqa: E731
        return (max(off(self.send_rows), off(self.recv_rows)) * self.row_bytes,
                max(off(self.send_assignments), off(self.recv_assignments)) * self.result_bytes)


def _no_lap(phase: str) -> None:
    pass
