"""What the engine hands out about its steps and expert statistics (`StepStats`, `StatsWindow`, for
/metrics and the recorder), and the `flush_stats` handshake (`_Flush`, `_finish`).

Separate from runtime/engine.py, the scheduler loop, because these are the values and waits that cross
from the engine's thread to the server's threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeplace.runtime.model import WindowStats


@dataclass(frozen=True)
class StepStats:
    """What the last step did, for /metrics: wall seconds, sequences stepped, tokens computed (all ranks)."""

    seconds: float
    batch: int
    tokens: int


@dataclass(frozen=True)
class StatsWindow:
    """The expert statistics of the steps between two collects: wall-clock span [start, end], steps and
    tokens (host counts), and the model's WindowStats (counts_LE, gpu_load_LG, samples_TLK)."""

    start: float
    end: float
    steps: int
    tokens: int
    stats: WindowStats


@dataclass
class _Flush:
    """One flush_stats call: what to run after the collect, set when done, what it raised."""

    then: object
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _finish(flushes: list[_Flush]) -> None:
    for flush in flushes:
        try:
            if flush.then is not None:
                flush.then()
        except Exception as exc:  # noqa: BLE001 - handed to the caller of flush_stats, not the engine loop
            flush.error = exc
        finally:
            flush.done.set()
