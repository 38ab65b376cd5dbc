"""An MoE layer's expert slots as a reshard sees them: one slot's tensors (`SlotWeights`), and a
layer's staged experts (`StagedLayer`) waiting to be installed by `EPMoE.install`.

Legend: S slots of this rank, N staged experts, F expert intermediate, D hidden; f, d: 128-blocks.
Per expert four tensors, always moved together: w13 [2F, D] float8_e4m3fn, w13_sinv [2f, d] float32,
w2 [D, F] float8_e4m3fn, w2_sinv [d, f] float32 (`SLOT_TENSORS` names them in EPMoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SLOT_TENSORS = ("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf")


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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def empty_like(cls, one: SlotWeights, n: int) -> SlotWeights:
        """[N, ...] uninitialised tensors shaped like N copies of the expert `one`."""
        return cls(*(torch.empty((n, *t.shape), dtype=t.dtype, device=t.device) for t in one.tensors()))


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
