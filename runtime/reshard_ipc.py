"""Copy-engine transfers between the ranks of one node: each rank maps its same-node peers' slot
tensors once (CUDA IPC handles, shared at connect) and pulls the experts it receives with peer copies
(the driver's peer copies on this rank's copy streams): the GPUs' copy engines move the bytes, no SM
runs a kernel for them, and nothing is posted on the peer's side.

Why pulling from live slots is safe: a sender overwrites a slot only when it installs that layer,
which happens after the layer's agreement, which every receiver enters only once its pulls are done.

A pull's copies: one per tensor per run of consecutive peer slots for the two weight tensors; the two
small scale tensors (7 KB and 3.5 KB an expert at DeepSeek-V3 size) in one copy each of the peer's slot
range the pull spans, into scratch rows, then one gather into the staging rows. A copy costs the copy
engine a fixed ~11 us whatever its size, and scattered experts' scale copies took ~16% of the link
(BENCHMARKS.md, live reshard, "the copy pattern"). Where the driver has `cuMemcpyBatchAsync` (CUDA
12.8+), a stream's copies go in one driver call: the host cost of a pull no longer grows with its runs.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import numpy as np
import torch
from torch.multiprocessing.reductions import reduce_tensor

from moeplace.runtime.cuda_driver import load_driver
from moeplace.runtime.slots import SlotWeights, as_words, to_device

WEIGHTS, SCALES = (0, 2), (1, 3)  # positions in SlotWeights.tensors(): w13, w2 / w13_sinv, w2_sinv


def share_slots(moe_layers: list) -> list[list[tuple]]:
    """Picklable IPC handles of this rank's slot tensors, per layer row (four tensors each)."""
    return [[reduce_tensor(t) for t in m.read_slot(slice(None)).tensors()] for m in moe_layers]


def open_slots(shared: list[list[tuple]]) -> list[SlotWeights]:
    """A peer's slot tensors, mapped into this process (on the peer's device), per layer row."""
    return [SlotWeights(*(rebuild(*args) for rebuild, args in layer)) for layer in shared]


class CopyWork:
    """A batch of peer copies on one or more streams, done when each stream's event is: wait() as a c10d
    Work's (the current stream waits), synchronize() on the host."""

    def __init__(self, streams: list[torch.cuda.Stream], timing: bool = False) -> None:
        self.events = [torch.cuda.Event(enable_timing=timing) for _ in streams]
        for event, stream in zip(self.events, streams):
            event.record(stream)

    def wait(self) -> None:
        for event in self.events:
            torch.cuda.current_stream().wait_event(event)

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()


def slot_runs(src_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive slots in src_N [N]: (first row in src_N, first slot, length), each [R] int64."""
    src_N = np.asarray(src_N, dtype=np.int64)
    starts = np.flatnonzero(np.diff(src_N, prepend=src_N[:1] - 2) != 1) if len(src_N) else np.zeros(0, np.int64)
    return starts, src_N[starts], np.diff(np.append(starts, len(src_N)))


class PeerCopies:
    """Pulls from mapped peers: peers[rank][row] = that rank's slots of layer `row`.

    Copies are the CUDA driver's, called through ctypes (unified addresses: the peer's mapped memory has
    an address here; peer access is enabled at construction): torch's cross-device `copy_` spends ~40 us
    of host time per copy on device switches and cross-stream events. Where the driver library cannot be
    loaded, torch's `copy_` does the copies (same result). streams: copy streams (the weights' copies go
    round-robin over them); batch: one driver call per stream where the driver can; priority: the copy
    streams' (`ReshardOptions.stream_priority`)."""

    def __init__(self, device: torch.device, peers: dict[int, list[SlotWeights]], streams: int = 1,
                 batch: bool = True, priority: int = 0) -> None:
        self.device, self.peers = device, peers
        self.driver = load_driver()
        self.batch = batch and self.driver is not None and self.driver.batch_fn is not None
        # Peer access between this GPU and each peer's, both ways (`open` enables it before mapping; here:
        # already enabled, or the GPUs cannot reach each other and the copies go through host memory)
        self.direct = {p: self.driver.reach(device, slots[0].w13.device) if self.driver else False
                       for p, slots in peers.items()}
        for p in (p for p, direct in self.direct.items() if self.driver and not direct):
            print(f"reshard: {device} has no peer access to rank {p}'s GPU: copies from it are staged through "
                  "host memory, at a fraction of the link's speed", file=sys.stderr, flush=True)
        # The copies run on streams of their own, ordered after the reshard stream's work when posted:
        # on the reshard stream itself, a layer's checksum kernels would queue behind the next layer's
        # copies, and the link would idle while the host waits for both.
        self.copy_streams = [torch.cuda.Stream(device, priority) for _ in range(streams)]
        # torch's copy_ (no driver) issues a cross-device copy on the source device's current stream: a
        # side stream there too, or the copies would queue on that device's default stream in this process.
        self.streams = {p: torch.cuda.Stream(slots[0].w13.device) for p, slots in peers.items()}
        # A peer's scale tensors of one layer (every slot), as words: the range a pull spans lands here,
        # then is gathered. One per peer for all layers: its copies and gathers all run on the first copy
        # stream, so a later pull's copy into it waits for the earlier gather (stream order).
        self.scratch = {p: [as_words(torch.empty_like(slots[0].tensors()[i], device=device)) for i in SCALES]
                        for p, slots in peers.items()} if self.driver is not None else {}
        self.spent = Spent()  # where pulls spend the reshard thread's time (the server log's `pulls` line)

    @classmethod
    def open(cls, device: torch.device, shared: dict[int, list[list[tuple]]], streams: int = 1,
             batch: bool = True, priority: int = 0) -> PeerCopies:
        """Map each peer rank's shared slots (`share_slots`) and pull from them. Peer access between this
        GPU and every other visible one, both ways (`Driver.reach`), is enabled first, so that the
        mappings exist with it (torch opens IPC handles with lazy peer access)."""
        driver = load_driver()
        if driver is not None:
            for index in range(torch.cuda.device_count()):
                if index != device.index:
                    driver.reach(device, torch.device("cuda", index))
        return cls(device, {p: open_slots(handles) for p, handles in shared.items()}, streams, batch, priority)

    def reaches(self, peer: int) -> bool:
        return peer in self.peers

    def pull(self, peer: int, row: int, src_N: np.ndarray, dst: SlotWeights) -> CopyWork:
        """dst [N, ...] <- `peer`'s slots src_N (0..S-1) of layer `row`, on the copy streams after the
        current stream's work; one work for all."""
        spent = self.spent.start()
        for stream in self.copy_streams:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        src = self.peers[peer][row]
        if not len(src_N):
            return CopyWork(self.copy_streams)
        if self.driver is None:
            return self._pull_torch(peer, src, src_N, dst)
        begins = [torch.cuda.Event(enable_timing=True) for _ in self.copy_streams]
        for begin, stream in zip(begins, self.copy_streams):
            begin.record(stream)
        spent.lap("order")
        starts, firsts, lengths = slot_runs(src_N)
        plan = _CopyPlan(len(self.copy_streams))
        for i in WEIGHTS:  # one copy per run, round-robin over the streams
            plan.runs(dst.tensors()[i], src.tensors()[i], starts, firsts, lengths)
        lo, hi = int(src_N.min()), int(src_N.max()) + 1
        for i, scratch in zip(SCALES, self.scratch[peer]):  # the spanned range in one copy, on stream 0
            row = scratch.stride(0) * scratch.element_size()
            assert hi <= scratch.shape[0], (hi, scratch.shape)
            plan.add(0, scratch.data_ptr() + lo * row, src.tensors()[i].data_ptr() + lo * row, (hi - lo) * row)
        arrays = plan.arrays()
        spent.lap("plan")
        self.driver.bind(self.device)
        for stream, (dsts, srcs, sizes) in zip(self.copy_streams, arrays):
            if self.batch:
                self.driver.batch(dsts, srcs, sizes, stream.cuda_stream)
            else:
                for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
                    self.driver.copy(d, s, n, stream.cuda_stream)
        spent.lap("driver")
        with torch.cuda.stream(self.copy_streams[0]):  # after the scale copies: gather the pulled rows
            index = to_device(src_N, self.device)
            for i, scratch in zip(SCALES, self.scratch[peer]):
                torch.index_select(scratch, 0, index, out=as_words(dst.tensors()[i]))
        work = CopyWork(self.copy_streams, timing=True)
        spent.lap("gather")
        spent.on_gpu(begins, work.events, dst.nbytes)
        return work

    def _pull_torch(self, peer: int, src: SlotWeights, src_N: np.ndarray, dst: SlotWeights) -> CopyWork:
        stream = self.copy_streams[0]
        with torch.cuda.stream(self.streams[peer]), torch.cuda.stream(stream):
            for lo, first, n in zip(*(a.tolist() for a in slot_runs(src_N))):
                for d, s in zip(dst.rows(lo, lo + n).wire(), src.rows(first, first + n).wire()):
                    d.copy_(s, non_blocking=True)
        return CopyWork([stream])


class Spent:
    """Wall and CPU seconds of the calling thread per named section, summed over calls: start() a call,
    then lap(name) at the end of each section. A stretch with wall time but no CPU time is a wait."""

    def __init__(self) -> None:
        self.wall_s, self.cpu_s = defaultdict(float), defaultdict(float)
        self.calls = 0
        self.spans: list[tuple[list, list, int]] = []  # per pull: events at its streams' start and end, bytes

    def start(self) -> Spent:
        self.calls += 1
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.wall_s[name] += wall - self._wall
        self.cpu_s[name] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def on_gpu(self, begins: list, ends: list, nbytes: int) -> None:
        """A pull's copies ran on the GPU from `begins` to `ends` (timing events, one per copy stream)."""
        self.spans.append((begins, ends, nbytes))

    def line(self) -> str:
        """The host's sections (ms wall/CPU), then the copies' time on the GPU from each pull's streams'
        start to its last end, and their rate: a slow link against slow host calls. Call once the
        pulls are done (their events must have completed)."""
        text = f"{self.calls} pulls; " + " ".join(
            f"{name} {1e3 * self.wall_s[name]:.1f}/{1e3 * self.cpu_s[name]:.1f}" for name in self.wall_s)
        if self.spans and all(e.query() for begins, ends, _ in self.spans for e in (*begins, *ends)):
            ms = sum(max(b.elapsed_time(e) for b, e in zip(begins, ends)) for begins, ends, _ in self.spans)
            nbytes = sum(n for _, _, n in self.spans)
            text += f"; on the GPU {ms:.1f} ms for {nbytes / 1e9:.2f} GB ({nbytes / 1e6 / ms if ms else 0:.0f} GB/s)"
        return text


class _CopyPlan:
    """A pull's copies (destination, source, bytes) per copy stream, built with array arithmetic."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.parts: list[tuple[np.ndarray, ...]] = []  # (stream, dst, src, size) arrays
        self.next = 0  # the stream the next run goes to

    def runs(self, dst: torch.Tensor, src: torch.Tensor, starts, firsts, lengths) -> None:
        """dst rows [start, start + length) <- src rows [first, first + length) for each run."""
        row = dst.stride(0) * dst.element_size()
        assert row == src.stride(0) * src.element_size(), (dst.shape, src.shape)
        stream = (self.next + np.arange(len(starts))) % self.streams
        self.next = (self.next + len(starts)) % self.streams
        self.parts.append((stream, dst.data_ptr() + starts * row, src.data_ptr() + firsts * row, lengths * row))

    def add(self, stream: int, dst: int, src: int, size: int) -> None:
        self.parts.append(tuple(np.array([v], dtype=np.int64) for v in (stream, dst, src, size)))

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per stream: uint64 destination and source addresses and byte counts."""
        stream, dst, src, size = (np.concatenate([np.asarray(p[k], dtype=np.int64) for p in self.parts])
                                  for k in range(4))
        return [tuple(np.ascontiguousarray(a[stream == s]).astype(np.uint64) for a in (dst, src, size))
                for s in range(self.streams)]
