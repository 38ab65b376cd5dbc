"""What a reshard sends per expert: its weights and scales packed into one uint8 vector, and a checksum
per expert of a packed payload."""

from __future__ import annotations

import torch

SLOT_TENSORS = ("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf")


def pack(moe, slot: int) -> torch.Tensor:
    """One expert's weights and scales as one uint8 vector (they always move together)."""
    return torch.cat([getattr(moe, n)[slot].contiguous().view(torch.uint8).reshape(-1) for n in SLOT_TENSORS])


def unpack(moe, payload: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `pack`: the slot tensors of one expert, as copies, so the received buffer can be freed."""
    out, start = [], 0
    for name in SLOT_TENSORS:
        like = getattr(moe, name)[0]
        n = like.numel() * like.element_size()
        out.append(payload[start: start + n].clone().view(like.dtype).view(like.shape))
        start += n
    return out


def checksums(payload: torch.Tensor, expert_bytes: int) -> torch.Tensor:
    """[n] int64, one per expert of a packed payload: a position-weighted sum of its 32-bit words.
    Catches flipped, swapped or missing bytes (not an adversary); one kernel for all experts, no sync."""
    assert expert_bytes % 4 == 0 and payload.numel() % expert_bytes == 0, (payload.numel(), expert_bytes)
    words = payload.view(torch.int32).view(-1, expert_bytes // 4)
    weights = torch.arange(words.shape[1], dtype=torch.int64, device=payload.device) % 65521 + 1
    return (words.to(torch.int64) * weights).sum(dim=1)
