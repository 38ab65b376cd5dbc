"""Expert-count histogram: tokens routed to each expert, accumulated on device (no host sync), for the
profiler's per-step recorder. Dimensions: T = tokens, K = top-k, E = experts."""

import torch

from moeplace.kernels._triton import require_triton, tl, triton


@triton.jit
def _histogram_kernel(ids_ptr, counts_ptr, n, E, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    # -1 is "no selection" (a token's slot routed off this rank); anything else out of range is skipped too
    tl.atomic_add(counts_ptr + ids, 1, mask=(ids >= 0) & (ids < E))


def check_topk_ids(topk_ids_TK: torch.Tensor) -> None:
    assert topk_ids_TK.dim() == 2, f"topk_ids_TK must be [T, K], got shape {tuple(topk_ids_TK.shape)}"
    assert topk_ids_TK.dtype in (torch.int32, torch.int64), f"topk_ids_TK: integer ids expected, got {topk_ids_TK.dtype}"
    assert topk_ids_TK.is_contiguous(), f"topk_ids_TK must be contiguous, strides {topk_ids_TK.stride()}"


def expert_histogram(topk_ids_TK: torch.Tensor, num_experts: int, counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """topk_ids_TK: [T, K] int32/int64 expert ids, -1 = no selection → counts_E [num_experts] int32.

    With `counts_E` given (int32, [num_experts], same device) the counts are added into it, so a
    recorder can accumulate a window of steps in place; ids outside [0, num_experts) are not counted."""
    require_triton()
    check_topk_ids(topk_ids_TK)
    assert num_experts > 0, f"num_experts must be positive, got {num_experts}"
    if counts_E is None:
        counts_E = torch.zeros(num_experts, dtype=torch.int32, device=topk_ids_TK.device)
    assert counts_E.shape == (num_experts,) and counts_E.dtype == torch.int32, \
        f"counts_E must be [{num_experts}] int32, got {tuple(counts_E.shape)} {counts_E.dtype}"
    assert counts_E.device == topk_ids_TK.device and counts_E.is_contiguous(), \
        f"counts_E must be contiguous on {topk_ids_TK.device}, got {counts_E.device}"
    n = topk_ids_TK.numel()
    BLOCK = 1024
    _histogram_kernel[(max(triton.cdiv(n, BLOCK), 1),)](topk_ids_TK, counts_E, n, num_experts, BLOCK=BLOCK)
    return counts_E


def expert_histogram_ref(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Plain-torch reference: [num_experts] int32 counts of ids in [0, num_experts)."""
    check_topk_ids(topk_ids_TK)
    ids = topk_ids_TK.flatten().long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return torch.bincount(ids, minlength=num_experts).to(torch.int32)
