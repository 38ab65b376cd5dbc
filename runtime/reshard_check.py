"""`LayerChecks`: a staged layer's checksums (runtime/reshard_wire.py), computed as its rows land.

On a GPU each piece of a layer is summed on a check stream of its own as soon as its transfer is done
(the stream waits for the piece's work, then reads the piece once), and the local copies as soon as
they are gathered. By the time the host has seen a layer's last transfer complete, all but the last
piece are checked: the last layer adds one piece's pass to a reshard, not a whole layer's. The host
then reads N sums back (one small copy into pinned memory, sleeping on an event meanwhile) and
compares them with the table itself. On CPU (gloo: a work completes only in the host's wait()) the
whole layer is summed at the end, after the transfers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from moeplace.runtime.reshard_wire import expert_sums
from moeplace.runtime.slots import SlotWeights


class LayerChecks:
    """buffers [N, ...]: the layer's staging rows, [0, n_local) local copies, then received rows;
    received(rows): called on received rows before they are summed (a test's fault corrupts them
    there, as a faulty wire would); stream: the check stream (None on CPU); slots >= N: the rank's
    slots per layer, the size of the pinned host rows (one size: the host allocator's cached block)."""

    def __init__(self, buffers: SlotWeights, n_local: int, received: Callable[[SlotWeights], None],
                 stream: torch.cuda.Stream | None, slots: int) -> None:
        self.buffers, self.n_local, self.received, self.stream = buffers, n_local, received, stream
        n, device = buffers.w13.shape[0], buffers.w13.device
        if stream is not None:
            self.sums_N = torch.empty(n, dtype=torch.int64, device=device)
            self.host_N = torch.empty(max(slots, n), dtype=torch.int64, pin_memory=True)[:n]

    def local_gathered(self) -> None:
        """The local copies were gathered on the current stream: check them once it gets there."""
        if self.stream is None or self.n_local == 0:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.buffers.w13.device))
        with torch.cuda.stream(self.stream):
            self.sums_N[:self.n_local] = expert_sums(self.buffers.rows(0, self.n_local))

    def landed(self, lo: int, hi: int, works: list) -> None:
        """Received rows [lo, hi) arrive with `works` (c10d works, or copy works): check them once
        those are done. On CPU nothing happens here (`sums` checks everything)."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            for work in works:
                work.wait()  # this stream waits for the transfer; the host does not
            rows = self.buffers.rows(lo, hi)
            self.received(rows)
            self.sums_N[lo:hi] = expert_sums(rows)

    def sums(self) -> np.ndarray:
        """[N] int64 checksums of every staged row, once the transfers are done (on CPU: computed now)."""
        if self.stream is None:
            self.received(self.buffers.rows(self.n_local, self.buffers.w13.shape[0]))
            return expert_sums(self.buffers).numpy()
        with torch.cuda.stream(self.stream):
            self.host_N.copy_(self.sums_N, non_blocking=True)
        self.drain()
        return self.host_N.numpy()

    def drain(self) -> None:
        """Every queued check done (the staging may be freed, the sums read). After a failure too."""
        if self.stream is not None:
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
            done.synchronize()
