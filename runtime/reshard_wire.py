"""What a reshard checks per expert: a checksum of its bytes, computed in one pass.

Experts cross the wire as they lie in their slots (`SlotWeights.wire()`: uint8 views of the four
tensors, straight from the sender's slots into the receiver's slot-shaped staging): nothing is
packed or unpacked. An expert's bytes never change while it is served, so its checksum is a
property of (layer, expert): every rank computes the checksums of its slots once at start-up and
all ranks share them (`ChecksumTable`). A receiver then checks each expert it staged against the
table in one read of the staged bytes; no checksum travels with the data, and senders read nothing
extra.

The checksum: the sum, modulo 2^64, of the expert's bytes read as 64-bit words. Why that is enough:
it guards against transport faults, not an adversary. Any change confined to one word (a flipped
bit or byte, a torn write) changes the sum, since a non-zero change of one word is never 0 modulo
2^64; a buffer that was not written (stale staging) or holds another expert's bytes (a mismatched
plan) differs in sum except by a 2^-64-scale coincidence of random weights; missing bytes leave
stale ones behind. What it misses, reordered words within one expert, is not a failure mode of a
DMA copy or of NCCL/gloo, which move contiguous memory. Integer addition modulo 2^64 is
associative, so every device and reduction order gets the same sum, and torch sums int64 tensors
without a widening copy: one kernel per tensor, reading each byte once.
"""

from __future__ import annotations

import numpy as np
import torch

from moeplace.runtime.slots import SlotWeights, as_words


def expert_sums(experts: SlotWeights) -> torch.Tensor:
    """[N] int64 checksums of N experts (tensors with a leading N), on their device, no host sync."""
    n = experts.w13.shape[0]
    total = torch.zeros(n, dtype=torch.int64, device=experts.w13.device)
    for t in experts.tensors():
        words = as_words(t)
        # 64-bit words sum in place; narrower ones (small scale tensors only) are widened first
        total += words.sum(dim=1) if words.dtype == torch.int64 else words.to(torch.int64).sum(dim=1)
    return total


class ChecksumTable:
    """sums_LE int64 [L, E]: the checksum of every (layer row, logical expert), on every rank.

    Built by `gather`, a collective: each rank sums its own slots, the sums of all ranks are
    gathered, and the replicas of an expert must agree (they hold the same bytes)."""

    def __init__(self, sums_LE: np.ndarray) -> None:
        self.sums_LE = sums_LE

    @classmethod
    def gather(cls, moe_layers: list, phy2log_LP: np.ndarray, num_experts: int, gather_objects) -> ChecksumTable:
        """gather_objects(obj) -> list of every rank's obj (e.g. dist.all_gather_object on a gloo group)."""
        S = moe_layers[0].w13_SFD.shape[0]
        mine_LS = np.stack([expert_sums(m.read_slot(slice(None))).cpu().numpy() for m in moe_layers])
        sums_LP = np.concatenate(gather_objects(mine_LS), axis=1)
        L, P = phy2log_LP.shape
        assert sums_LP.shape == (L, P) and P % S == 0, (sums_LP.shape, phy2log_LP.shape, S)
        sums_LE = np.zeros((L, num_experts), dtype=np.int64)
        rows = np.repeat(np.arange(L), P)
        sums_LE[rows, phy2log_LP.reshape(-1)] = sums_LP.reshape(-1)
        differ = sums_LE[rows, phy2log_LP.reshape(-1)] != sums_LP.reshape(-1)
        assert not differ.any(), f"replicas of one expert hold different bytes at slots {np.flatnonzero(differ)[:5]}"
        return cls(sums_LE)
