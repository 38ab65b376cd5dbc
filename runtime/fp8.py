"""FP8 block quantisation in the DeepSeek-V3 checkpoint convention.

A weight `w [..., N, K]` is stored as `float8_e4m3fn` plus a float32 `weight_scale_inv [..., n, k]`
with one scale per 128x128 block (n = ceil(N/128), k = ceil(K/128); edge blocks are partial):
    w_fp32[i, j] = w_fp8[i, j] * scale_inv[i // 128, j // 128]
Round-trip error (e4m3: 3 mantissa bits, smallest subnormal 2^-9) of an element in a block with
scale s = amax/448: at most max(|w| * 2^-4, s * 2^-10).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """Shape of the `weight_scale_inv` of a weight of `shape` ([..., N, K] -> [..., ceil(N/bn), ceil(K/bk)])."""
    *lead, N, K = shape
    return (*lead, math.ceil(N / block[0]), math.ceil(K / block[1]))


def quantize_blockwise(w_NK: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (w_fp8 [..., N, K] float8_e4m3fn, scale_inv [..., n, k] float32).

    Each block's largest magnitude maps to 448; an all-zero block gets scale_inv 1 (not 0, so the
    checkpoint holds no zero scales that would make a later requantisation divide by zero).
    """
    assert w_NK.dim() >= 2 and w_NK.is_floating_point(), f"need a float [..., N, K] weight, got {w_NK.dtype} {tuple(w_NK.shape)}"
    *lead, N, K = w_NK.shape
    bn, bk = block
    n, k = math.ceil(N / bn), math.ceil(K / bk)
    padded = torch.zeros(*lead, n * bn, k * bk, dtype=torch.float32, device=w_NK.device)
    padded[..., :N, :K] = w_NK.float()
    blocks = padded.reshape(*lead, n, bn, k, bk)
    amax_nk = blocks.abs().amax(dim=(-3, -1))
    scale_inv_nk = torch.where(amax_nk > 0, amax_nk / FP8_MAX, torch.ones_like(amax_nk))
    scaled = blocks / scale_inv_nk[..., :, None, :, None]
    w_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(*lead, n * bn, k * bk)[..., :N, :K]
    return w_fp8.contiguous(), scale_inv_nk.contiguous()


def dequantize_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(w_fp8 [..., N, K] float8_e4m3fn, scale_inv [..., n, k] float32) -> w [..., N, K] `dtype`."""
    assert w_fp8.dtype == FP8_DTYPE, f"weight must be float8_e4m3fn, got {w_fp8.dtype}"
    assert scale_inv.shape == scale_shape(tuple(w_fp8.shape), block), (
        f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w_fp8.shape)} in {block} blocks"
    )
    N, K = w_fp8.shape[-2:]
    scale_NK = scale_inv.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return (w_fp8.float() * scale_NK[..., :N, :K]).to(dtype)
