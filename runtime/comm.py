"""`Comm`: the collectives of the EP runtime over one process group (gloo on CPU, NCCL on GPU).

No group (None) is a single process of world size 1, even where torch.distributed is initialised:
every collective returns its input, so the same MoE code serves one process and many, and a rank
can run a private model (the tiny model's bias fit) beside the shared one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# dtypes both gloo and NCCL move as they are; anything else (FP8 weights) travels as its bytes.
_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8)


@dataclass(frozen=True)
class Comm:
    group: dist.ProcessGroup | None
    rank: int
    world_size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> Comm:
        """The ranks of `group` (e.g. dist.group.WORLD); None: this process alone."""
        if group is None:
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def all_to_all(self, x_MX: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows x_MX[sum(send_counts[:g]) : ...] go to rank g; returns [sum(recv_counts), ...] in source-rank order."""
        assert len(send_counts) == len(recv_counts) == self.world_size, (send_counts, recv_counts)
        assert x_MX.shape[0] == sum(send_counts), f"{x_MX.shape[0]} rows but send_counts sum to {sum(send_counts)}"
        if self.world_size == 1:
            return x_MX
        wire = x_MX.contiguous() if x_MX.dtype in _WIRE_DTYPES else x_MX.contiguous().view(torch.uint8)
        out = wire.new_empty((sum(recv_counts), *wire.shape[1:]))
        dist.all_to_all_single(out, wire, recv_counts, send_counts, group=self.group)
        return out if wire.dtype == x_MX.dtype else out.view(x_MX.dtype)

    def all_to_all_equal(self, x_GX: torch.Tensor) -> torch.Tensor:
        """x_GX [G, ...]: block g goes to rank g; returns [G, ...] with block g from rank g.

        Equal splits, so no sizes travel and nothing is read on the host: capturable in a CUDA graph
        (NCCL), and the fixed-capacity decode dispatch's only collective. Every rank passes one shape."""
        assert x_GX.shape[0] == self.world_size, f"{x_GX.shape[0]} blocks for {self.world_size} ranks"
        if self.world_size == 1:
            return x_GX
        wire = x_GX.contiguous() if x_GX.dtype in _WIRE_DTYPES else x_GX.contiguous().view(torch.uint8)
        out = torch.empty_like(wire)
        dist.all_to_all_single(out, wire, group=self.group)
        return out if wire.dtype == x_GX.dtype else out.view(x_GX.dtype)

    def exchange_counts(self, send_G: torch.Tensor) -> torch.Tensor:
        """send_G int64 [G] rows for each rank -> recv_G int64 [G] rows coming from each rank."""
        if self.world_size == 1:
            return send_G
        recv_G = torch.empty_like(send_G)
        dist.all_to_all_single(recv_G, send_G.contiguous(), group=self.group)
        return recv_G

    def all_gather_rows(self, x_MX: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order; rank g contributes counts[g] rows."""
        assert x_MX.shape[0] == counts[self.rank], f"rank {self.rank} has {x_MX.shape[0]} rows, expected {counts[self.rank]}"
        if self.world_size == 1:
            return x_MX
        # The gather needs equal sizes: pad every rank's rows to the largest count, then drop the padding.
        width = max(counts)
        padded = x_MX.new_zeros((width, *x_MX.shape[1:]))
        padded[: x_MX.shape[0]] = x_MX
        out = x_MX.new_empty((self.world_size * width, *x_MX.shape[1:]))
        _all_gather_single(out, padded, self.group)
        return torch.cat([out[g * width: g * width + n] for g, n in enumerate(counts)])

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the ranks, in place; returns x."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (so a failure on one rank stops all, instead of a hang)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor (which it deprecates) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
