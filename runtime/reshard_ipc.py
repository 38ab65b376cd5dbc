"""Copy-engine transfers between the ranks of one node: each rank maps its same-node peers' slot
tensors once (CUDA IPC handles, shared at connect) and pulls the experts it receives with peer copies
(the driver's peer copies on this rank's reshard stream): the GPUs' copy engines move the bytes, no SM
runs a kernel for them, and nothing is posted on the peer's side.

Why pulling from live slots is safe: a sender overwrites a slot only when it installs that layer,
which happens after the layer's agreement, which every receiver enters only once its pulls are done.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch.multiprocessing.reductions import reduce_tensor

from moeplace.runtime.slots import SlotWeights


def share_slots(moe_layers: list) -> list[list[tuple]]:
    """Picklable IPC handles of this rank's slot tensors, per layer row (four tensors each)."""
    return [[reduce_tensor(t) for t in m.read_slot(slice(None)).tensors()] for m in moe_layers]


def open_slots(shared: list[list[tuple]]) -> list[SlotWeights]:
    """A peer's slot tensors, mapped into this process (on the peer's device), per layer row."""
    return [SlotWeights(*(rebuild(*args) for rebuild, args in layer)) for layer in shared]


class CopyWork:
    """A batch of peer copies on one or more streams, done when each stream's event is: wait() as a c10d
    Work's (the current stream waits), synchronize() on the host."""

    def __init__(self, streams: list[torch.cuda.Stream]) -> None:
        self.events = [torch.cuda.Event() for _ in streams]
        for event, stream in zip(self.events, streams):
            event.record(stream)

    def wait(self) -> None:
        for event in self.events:
            torch.cuda.current_stream().wait_event(event)

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()


class PeerCopies:
    """Pulls from mapped peers: peers[rank][row] = that rank's slots of layer `row`.

    Each copy is one `cuMemcpyAsync` of the CUDA driver on this device's current stream (unified
    addresses: the peer's mapped memory has an address here, and the IPC mapping enabled peer
    access), called through ctypes: torch's cross-device `copy_` spends ~40 us of host time per copy
    on device switches and cross-stream events (BENCHMARKS.md, live reshard), which at four tensors
    per expert made the host, not the link, set a layer's time. Where the driver library cannot be
    loaded, torch's `copy_` does the copies (same result)."""

    def __init__(self, device: torch.device, peers: dict[int, list[SlotWeights]], streams: int = 1) -> None:
        self.device, self.peers = device, peers
        self.driver = _driver()
        # The copies run on streams of their own, ordered after the reshard stream's work when posted:
        # on the reshard stream itself, a layer's checksum kernels would queue behind the next layer's
        # copies, and the link would idle while the host waits for both. With several, a pull's copies
        # go round-robin over them (with the driver): one stream's copies run one after another.
        self.copy_streams = [torch.cuda.Stream(device) for _ in range(streams)]
        # torch's copy_ (no driver) issues a cross-device copy on the source device's current stream: a
        # side stream there too, or the copies would queue on that device's default stream in this process.
        self.streams = {p: torch.cuda.Stream(slots[0].w13.device) for p, slots in peers.items()}

    def reaches(self, peer: int) -> bool:
        return peer in self.peers

    def pull(self, peer: int, row: int, src_N: np.ndarray, dst: SlotWeights) -> CopyWork:
        """dst [N, ...] <- `peer`'s slots src_N (0..S-1) of layer `row`: one copy per tensor per run of
        consecutive slots, on the copy streams after the current stream's work; one work for all."""
        for stream in self.copy_streams:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        src = self.peers[peer][row]
        breaks = np.flatnonzero(np.diff(src_N) != 1) + 1
        runs = [(lo, hi, int(src_N[lo])) for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(src_N)])]
        if self.driver is not None:
            # addresses computed here, no torch call per copy: in a busy server each torch call gives
            # the GIL up and waits to get it back from the serving thread
            self.driver.bind(self.device)
            handles, i = [s.cuda_stream for s in self.copy_streams], 0
            for d, s in zip(dst.tensors(), src.tensors()):
                row, d0, s0 = d.stride(0) * d.element_size(), d.data_ptr(), s.data_ptr()
                for lo, hi, first in runs:
                    self.driver.copy(d0 + lo * row, s0 + first * row, (hi - lo) * row, handles[i % len(handles)])
                    i += 1
            return CopyWork(self.copy_streams)
        stream = self.copy_streams[0]
        with torch.cuda.stream(self.streams[peer]), torch.cuda.stream(stream):
            for lo, hi, first in runs:
                for d, s in zip(dst.rows(lo, hi).wire(), src.rows(first, first + hi - lo).wire()):
                    d.copy_(s, non_blocking=True)
        return CopyWork([stream])


class _Driver:
    """The CUDA driver's cuMemcpyAsync(dst, src, bytes, stream), through ctypes, holding the GIL (PyDLL:
    each call takes microseconds; giving the GIL up around it would wait for the serving thread to hand
    it back, hundreds of times a layer). A driver call needs a current context on the calling thread,
    which torch leaves unset on a new thread of device 0 (its set_device skips cudaSetDevice for the
    device the runtime already reports): each batch of copies first makes the device's primary context
    (the one torch uses) current where none is."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        for name in ("cuMemcpyAsync", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuDeviceGet",
                     "cuDevicePrimaryCtxRetain"):
            getattr(lib, name).restype = ctypes.c_int

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """nbytes from address src to dst (unified addresses), queued on the CUDA stream handle `stream`."""
        _check("cuMemcpyAsync", self.lib.cuMemcpyAsync(dst, src, nbytes, ctypes.c_void_p(stream)))

    def bind(self, device: torch.device) -> None:
        ctx = ctypes.c_void_p()
        _check("cuCtxGetCurrent", self.lib.cuCtxGetCurrent(ctypes.byref(ctx)))
        if ctx.value:
            return
        dev = ctypes.c_int()
        _check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), device.index))
        _check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        _check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(ctx))


def _driver() -> _Driver | None:
    """None where the driver library is absent (torch's copy_ then does the copies)."""
    try:
        return _Driver(ctypes.PyDLL("libcuda.so.1"))
    except (OSError, AttributeError):
        return None


def _check(call: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed: CUDA driver error {status}")
