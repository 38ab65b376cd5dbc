"""`Handover`: staged layers passed from a rank's reshard thread to its serving thread, within the
staging budget: staged (posted, being checked), committed (agreed by every rank), installed.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from moeplace.runtime.slots import StagedLayer


class Handover:
    """Staged layers between the reshard thread and the serving thread, within the staging budget.

    A row is staged (posted, being checked), then committed (agreed by every rank; rank 0 queues its
    swap), then installed by the serving thread. On ranks other than 0 the install may come before
    the reshard thread's commit (rank 0 passed the agreement first and its step broadcast got here
    first): a row installed already is then not committed again. on_commit(row, phy2log_P): called
    once a row is committed (rank 0 queues its swap there)."""

    def __init__(self, staging_bytes: int, on_commit: Callable[[int, np.ndarray], None]) -> None:
        self.staging_bytes, self.on_commit = staging_bytes, on_commit
        self._staged: dict[int, StagedLayer] = {}  # staged or committed, not installed yet
        self._committed: set[int] = set()
        self._cond = threading.Condition()

    def _bytes(self) -> int:
        return sum(staged.buffers.nbytes for staged in self._staged.values())

    def reserve(self, nbytes: int) -> None:
        """Wait until installs free room for `nbytes` more (never for layers still in flight)."""
        with self._cond:
            self._cond.wait_for(lambda: self._room(nbytes))

    def has_room(self, nbytes: int) -> bool:
        """Whether `reserve(nbytes)` would return at once."""
        with self._cond:
            return self._room(nbytes)

    def _room(self, nbytes: int) -> bool:
        return not self._committed or self._bytes() + nbytes <= self.staging_bytes

    def stage(self, row: int, staged: StagedLayer) -> None:
        with self._cond:
            self._staged[row] = staged

    def commit(self, row: int, phy2log_P: np.ndarray) -> None:
        with self._cond:
            if row in self._staged:
                self._committed.add(row)
        self.on_commit(row, phy2log_P)

    def discard(self, row: int) -> None:
        with self._cond:
            self._staged.pop(row, None)
            self._cond.notify_all()

    def take(self, row: int) -> StagedLayer:
        with self._cond:
            return self._staged.pop(row)

    def installed(self, row: int) -> None:
        with self._cond:
            self._committed.discard(row)
            self._cond.notify_all()

    def wait_all_installed(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._committed)
