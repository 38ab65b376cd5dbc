"""The CUDA driver API calls a reshard's peer copies need, through ctypes (no CUDA Python bindings are
required): `cuMemcpyAsync`, `cuMemcpyBatchAsync` (CUDA 12.8+), peer access between primary contexts.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch


class _Attributes(ctypes.Structure):
    """CUmemcpyAttributes (cuda.h, CUDA 12.8+): source access order, two location hints (type, id) that
    apply to managed memory only, flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_type", ctypes.c_int), ("src_loc_id", ctypes.c_int),
                ("dst_loc_type", ctypes.c_int), ("dst_loc_id", ctypes.c_int), ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1  # the sources are read in stream order (after the stream's earlier work)
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1
_PEER_ACCESS_ALREADY_ENABLED = 704  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
_BATCH_ABI = 12080  # cuMemcpyBatchAsync as CUDA 12.8 declared it (with failIdx); CUDA 13 dropped failIdx


class Driver:
    """The CUDA driver's cuMemcpyAsync(dst, src, bytes, stream) and, where present, cuMemcpyBatchAsync,
    through ctypes, holding the GIL (PyDLL: each call takes microseconds; giving the GIL up around it
    would wait for the serving thread to hand it back). A driver call needs a current context on the
    calling thread, which torch leaves unset on a new thread of device 0 (its set_device skips
    cudaSetDevice for the device the runtime already reports): each batch of copies first makes the
    device's primary context (the one torch uses) current where none is."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        for name in ("cuMemcpyAsync", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuDeviceGet",
                     "cuDevicePrimaryCtxRetain", "cuDeviceCanAccessPeer", "cuCtxEnablePeerAccess"):
            getattr(lib, name).restype = ctypes.c_int
        self.batch_fn = self._batch_fn()
        self.attrs = _Attributes(_SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0, _FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        self.attr_index = (ctypes.c_size_t * 1)(0)

    def _batch_fn(self):
        """cuMemcpyBatchAsync of the 12.8 ABI by version (a newer driver serves the old ABI too), or None."""
        get = getattr(self.lib, "cuGetProcAddress_v2", None)
        if get is None:
            return None
        fn, status = ctypes.c_void_p(), ctypes.c_int()
        get.restype = ctypes.c_int
        get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                        ctypes.POINTER(ctypes.c_int)]
        if get(b"cuMemcpyBatchAsync", ctypes.byref(fn), _BATCH_ABI, 0, ctypes.byref(status)) != 0 \
                or status.value != 0 or not fn.value:
            return None
        p = ctypes.POINTER
        proto = ctypes.PYFUNCTYPE(ctypes.c_int, p(ctypes.c_uint64), p(ctypes.c_uint64), p(ctypes.c_size_t),
                                  ctypes.c_size_t, p(_Attributes), p(ctypes.c_size_t), ctypes.c_size_t,
                                  p(ctypes.c_size_t), ctypes.c_void_p)
        return proto(fn.value)

    def reach(self, device: torch.device, peer: torch.device) -> bool:
        """Peer access between `device` and `peer` in both directions (their primary contexts, torch's),
        enabled now where the GPUs allow it; whether they do.

        Both directions, because torch maps a peer's IPC memory in the peer device's context of this
        process: a copy from it into `device`'s memory spans both contexts, and with access enabled only
        from `device` to `peer`, the driver staged every such copy through host memory, spinning the
        calling thread (measured on 2xH200: 31 GB/s and ~0.5 ms of host time per 22 MB expert, against
        350-380 GB/s and ~0.2 ms per layer with both; BENCHMARKS.md, live reshard, "both directions")."""
        return self._enable(device, peer) is not None and self._enable(peer, device) is not None

    def enabled(self, device: torch.device, peer: torch.device) -> bool:
        """Whether `device`'s context already has peer access to `peer`'s memory (enabling it if not)."""
        return self._enable(device, peer) == _PEER_ACCESS_ALREADY_ENABLED

    def _enable(self, device: torch.device, peer: torch.device) -> int | None:
        """Enable peer access from `device`'s primary context to `peer`'s memory: 0 (enabled now),
        _PEER_ACCESS_ALREADY_ENABLED, or None where the GPUs cannot. The calling thread's current
        context is restored."""
        can, dev, other_dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        _check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), device.index))
        _check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(other_dev), peer.index))
        _check("cuDeviceCanAccessPeer", self.lib.cuDeviceCanAccessPeer(ctypes.byref(can), dev, other_dev))
        if not can.value:
            return None
        saved, own, other = ctypes.c_void_p(), self._primary(device), self._primary(peer)
        _check("cuCtxGetCurrent", self.lib.cuCtxGetCurrent(ctypes.byref(saved)))
        _check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(own))
        try:
            status = self.lib.cuCtxEnablePeerAccess(other, 0)
            if status != _PEER_ACCESS_ALREADY_ENABLED:
                _check("cuCtxEnablePeerAccess", status)
        finally:
            _check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(saved))
        return status

    def _primary(self, device: torch.device) -> ctypes.c_void_p:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        _check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), device.index))
        _check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        return ctx

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """nbytes from address src to dst (unified addresses), queued on the CUDA stream handle `stream`."""
        _check("cuMemcpyAsync", self.lib.cuMemcpyAsync(dst, src, nbytes, ctypes.c_void_p(stream)))

    def batch(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int) -> None:
        """Every copy dsts[i] <- srcs[i] (sizes[i] bytes; uint64 arrays), queued on `stream` in one call."""
        if not len(dsts):
            return
        u64, size_t = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t)
        failed = ctypes.c_size_t(0)
        status = self.batch_fn(dsts.ctypes.data_as(u64), srcs.ctypes.data_as(u64), sizes.ctypes.data_as(size_t),
                               len(dsts), ctypes.byref(self.attrs), self.attr_index, 1, ctypes.byref(failed),
                               ctypes.c_void_p(stream))
        _check(f"cuMemcpyBatchAsync (copy {failed.value} of {len(dsts)})", status)

    def bind(self, device: torch.device) -> None:
        ctx = ctypes.c_void_p()
        _check("cuCtxGetCurrent", self.lib.cuCtxGetCurrent(ctypes.byref(ctx)))
        if not ctx.value:
            _check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(self._primary(device)))


def load_driver() -> Driver | None:
    """None where the driver library is absent (torch's copy_ then does the copies)."""
    try:
        return Driver(ctypes.PyDLL("libcuda.so.1"))
    except (OSError, AttributeError):
        return None


def _check(call: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed: CUDA driver error {status}")
