"""`LayerChecks`: a staged layer's checksums (runtime/reshard_wire.py), computed as its rows land.

On a GPU each piece of a layer is summed on a check stream of its own as soon as its transfer is done
(the stream waits for the piece's work, then reads the piece once), and the local copies as soon as
they are gathered. By the time the host has seen a layer's last transfer complete, all but the last
piece are checked: the last layer adds one piece's pass to a reshard, not a whole layer's. When the
layer is posted, its sums are queued for the host (one small copy into pinned memory, and an event
the host sleeps on): a layer's verdict never waits for the next layer's checks, queued after it.
On CPU (gloo: a work completes only in the host's wait()) the whole layer is summed at the end.

Few torch calls per piece: the reshard thread shares the GIL with a serving thread that runs Python
most of the time, and every torch call gives the GIL up and waits to get it back (up to the switch
interval). So the word views are made once per layer, and a piece costs one sum per tensor.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from moeplace.runtime.reshard_wire import expert_sums
from moeplace.runtime.slots import SlotWeights, as_words


class LayerChecks:
    """buffers [N, ...]: the layer's staging rows, [0, n_local) local copies, then received rows;
    received(rows): called on received rows before they are summed (a test's fault corrupts them
    there, as a faulty wire would); stream: the check stream (None on CPU); slots >= N: the rank's
    slots per layer, the size of the pinned host rows (one size: the host allocator's cached block).
    Protocol: local_gathered() and landed() in any order, then close() once, then sums() or drain()."""

    def __init__(self, buffers: SlotWeights, n_local: int, received: Callable[[SlotWeights], None],
                 stream: torch.cuda.Stream | None, slots: int) -> None:
        self.buffers, self.n_local, self.received, self.stream = buffers, n_local, received, stream
        self.done: torch.cuda.Event | None = None
        self.words = [as_words(t) for t in buffers.tensors()]  # [N, W] each: a checksum's words (and a gather's)
        if stream is None:
            return
        n = buffers.w13.shape[0]
        self.partial_TN = torch.empty(len(self.words), n, dtype=torch.int64, device=buffers.w13.device)
        self.host_N = torch.empty(max(slots, n), dtype=torch.int64, pin_memory=True)[:n]

    def local_gathered(self) -> None:
        """The local copies were gathered on the current stream: check them once it gets there."""
        if self.stream is None or self.n_local == 0:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.buffers.w13.device))
        with torch.cuda.stream(self.stream):
            self._sum(0, self.n_local)

    def landed(self, lo: int, hi: int, works: list) -> None:
        """Received rows [lo, hi) arrive with `works` (c10d works, or copy works): check them once
        those are done. On CPU nothing happens here (`sums` checks everything)."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            for work in works:
                work.wait()  # this stream waits for the transfer; the host does not
            self.received(self.buffers.rows(lo, hi))
            self._sum(lo, hi)

    def _sum(self, lo: int, hi: int) -> None:
        for t, words in enumerate(self.words):  # int64 sums of each row's words (narrower words widened)
            torch.sum(words[lo:hi], dim=1, dtype=torch.int64, out=self.partial_TN[t, lo:hi])

    def close(self) -> None:
        """Every check of the layer queued: queue its sums for the host."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            self.host_N.copy_(self.partial_TN.sum(dim=0), non_blocking=True)  # int64 wraps: sums mod 2^64
            self.done = torch.cuda.Event(blocking=True)
            self.done.record(self.stream)

    def sums(self) -> np.ndarray:
        """[N] int64 checksums of every staged row, once the transfers are done (on CPU: computed now)."""
        if self.stream is None:
            self.received(self.buffers.rows(self.n_local, self.buffers.w13.shape[0]))
            return expert_sums(self.buffers).numpy()
        self.drain()
        return self.host_N.numpy()

    def drain(self) -> None:
        """The layer's checks done (the staging may be freed, the sums read); after a failure too."""
        if self.done is not None:
            self.done.synchronize()  # a blocking event: the host sleeps, holding no GIL
