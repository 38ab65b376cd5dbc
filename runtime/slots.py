"""An MoE layer's expert slots as a reshard sees them: one slot's tensors (`SlotWeights`), and a
layer's staged experts (`StagedLayer`) waiting to be installed by `EPMoE.install`.

Legend: S slots of this rank, N staged experts, F expert intermediate, D hidden; f, d: 128-blocks.
Per expert four tensors, always moved together: w13 [2F, D] float8_e4m3fn, w13_sinv [2f, d] float32,
w2 [D, F] float8_e4m3fn, w2_sinv [d, f] float32 (`SLOT_TENSORS` names them in EPMoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SLOT_TENSORS = ("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf")


def as_words(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] contiguous -> the same bytes as [N, W] of the widest integer type dividing a row's bytes.

    Device copies, gathers and sums then move 8-byte words, not single bytes: a uint8 index kernel
    runs one byte per thread, several times slower on a GPU than the same bytes as int64."""
    n = t.shape[0]
    row = t.reshape(n, math.prod(t.shape[1:])).view(torch.uint8)  # not -1: n may be 0
    for dtype in (torch.int64, torch.int32, torch.int16):
        if row.shape[1] % dtype.itemsize == 0:
            return row.view(dtype)
    return row


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 indices on `device` without a host sync: a copy from pageable memory would first wait
    for everything queued on the stream (CUDA's rule), so it goes through pinned memory."""
    host = torch.as_tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_in(dst: torch.Tensor, host: torch.Tensor) -> None:
    """dst <- host (same shape), in place; from the host to a GPU without a host sync: a copy from
    pageable memory first waits for the stream's queued work (CUDA's rule), which in a swap between two
    steps is every install copy just queued; from pinned memory the copy queues behind them instead."""
    pinned = dst.is_cuda and host.device.type == "cpu"
    dst.copy_(host.pin_memory() if pinned else host, non_blocking=pinned)


def gather_rows(slot_words: list[torch.Tensor], src_N: np.ndarray, out_words: list[torch.Tensor]) -> None:
    """out [N, W] per tensor <- this rank's slots src_N, one gather per tensor (a device copy of 8-byte
    words); slot_words / out_words: the slot and staging tensors as words (`as_words`), made once."""
    if len(src_N) == 0:
        return
    index = to_device(src_N, out_words[0].device)
    for slots, rows in zip(slot_words, out_words):
        torch.index_select(slots, 0, index, out=rows)


def warm_pinned(most: int) -> None:
    """Pinned host blocks of every power-of-two size up to `most` bytes (the host allocator rounds sizes
    up so), eight of each, into torch's host allocator cache: a page-locked allocation later, during a
    reshard or a swap, would wait for the serving stream (it synchronizes)."""
    blocks = [torch.empty(1 << k, dtype=torch.uint8, pin_memory=True)
              for k in range(3, most.bit_length() + 1) for _ in range(8)]
    blocks.clear()  # back into the cache


@dataclass(frozen=True)
class SlotWeights:
    """The four tensors of one expert, or of N experts with a leading N (staging). Views, not copies."""

    w13: torch.Tensor
    w13_sinv: torch.Tensor
    w2: torch.Tensor
    w2_sinv: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w13, self.w13_sinv, self.w2, self.w2_sinv)

    def wire(self) -> tuple[torch.Tensor, ...]:
        """The tensors as uint8 views (same memory): every backend moves bytes, FP8 or not."""
        return tuple(t.view(torch.uint8) for t in self.tensors())

    def row(self, i: int) -> SlotWeights:
        return SlotWeights(*(t[i] for t in self.tensors()))

    def rows(self, lo: int, hi: int) -> SlotWeights:
        """Rows [lo, hi) of N experts: contiguous, so one transfer per tensor moves them all."""
        return SlotWeights(*(t[lo:hi] for t in self.tensors()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def empty_like(cls, one: SlotWeights, n: int) -> SlotWeights:
        """[N, ...] uninitialised tensors shaped like N copies of the expert `one`, carved from one
        allocation: one block for the caching allocator to find (or one cudaMalloc), not four."""
        sizes = [n * t.numel() * t.element_size() for t in one.tensors()]
        starts = np.cumsum([0] + [-(-size // _ALIGN) * _ALIGN for size in sizes])
        flat = torch.empty(int(starts[-1]), dtype=torch.uint8, device=one.w13.device)
        return cls(*(flat[start:start + size].view(t.dtype).view(n, *t.shape)
                     for t, start, size in zip(one.tensors(), starts.tolist(), sizes)))


_ALIGN = 256  # each tensor of a staging allocation starts 256-byte aligned (as cudaMalloc's blocks do)


@dataclass(frozen=True)
class StagedLayer:
    """A layer's new experts, staged: `buffers` [N, ...] and where they go.

    dst_slot_N int64 [N] this rank's slot (0..S-1) each buffer goes to; fanout_dst_X / fanout_src_X
    int64: further slots that take a copy of buffer fanout_src_X (a GPU wanting one expert in
    several slots receives it once). phy2log_P int64 [P]: the layer's whole new layout."""

    buffers: SlotWeights
    dst_slot_N: np.ndarray
    fanout_dst_X: np.ndarray
    fanout_src_X: np.ndarray
    phy2log_P: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.dst_slot_N)
        assert all(t.shape[0] == n for t in self.buffers.tensors()), (n, [t.shape for t in self.buffers.tensors()])
        assert len(set(self.dst_slot_N.tolist()) | set(self.fanout_dst_X.tolist())) == n + len(self.fanout_dst_X)
        assert ((0 <= self.fanout_src_X) & (self.fanout_src_X < n)).all(), self.fanout_src_X
