"""Per-token-group FP8 (e4m3) activation quantisation in Triton, as DeepSeek-V3 feeds its FP8 GEMMs;
`quant_rows` is shared by every kernel that quantises activations. The convention and the plain-torch
references are in fp8.py (importable without Triton).
Dimensions: T = tokens (rows), D = channels, G = D // 128 groups.
"""

import torch

from moeplace.kernels._triton import require_triton, tl, triton
# The plain-torch names are re-exported: the kernels and their tests import them from here too.
from moeplace.kernels.fp8 import (EPS, FP8, FP8_MAX, GROUP, check_activations, dequant_rows_ref,  # noqa: F401
                                  dequant_weight_blocks_ref, per_token_group_quant_fp8_ref, quant_weight_blocks_ref)


@triton.jit
def round_to_e4m3(y):
    """Round float32 y (|y| ≤ 448) to the nearest e4m3 value, ties to even, staying in float32. The cast
    that follows is then exact everywhere: Triton's CPU interpreter truncates float32 → fp8 (seen in 3.9),
    while the GPU rounds to nearest even; rounding here first makes the CPU tests check GPU semantics."""
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # 0x80000000, kept so that -0 and tiny negatives stay negative zeros
    # e4m3 keeps 3 fraction bits; below its smallest normal exponent (-6) the step stays 2^-9
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    # adding 1.5 * 2^(e + 20) leaves exactly 3 fraction bits of |y|, rounded to nearest even by the FPU
    c = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + c) - c
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quant_rows(x, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    """x: [R, 128] float32 → (q [R, 128] float8e4nv, scale [R] float32). Shared by every kernel that
    quantises activations, so that all of them round exactly like `per_token_group_quant_fp8_ref`."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(amax, EPS) / FP8_MAX
    # x / scale can land a rounding step above 448 at the amax element: clamp, never overflow.
    y = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
    return round_to_e4m3(y).to(tl.float8e4nv), scale


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, T, stride_xt, stride_qt, stride_st,
                  BLOCK_T: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # program (i, g): tokens [i*BLOCK_T, (i+1)*BLOCK_T), channels of group g
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = rows[:, None] < T
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = quant_rows(x, FP8_MAX, EPS)
    tl.store(q_ptr + rows[:, None] * stride_qt + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_st + g, s, mask=rows < T)


def per_token_group_quant_fp8(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_TD: [T, D] bf16/fp16/fp32 → (q_TD [T, D] float8_e4m3fn, scale_TG [T, D // 128] float32)."""
    require_triton()
    check_activations(x_TD)
    T, D = x_TD.shape
    q_TD = torch.empty(T, D, dtype=FP8, device=x_TD.device)
    scale_TG = torch.empty(T, D // GROUP, dtype=torch.float32, device=x_TD.device)
    BLOCK_T = 16
    grid = (triton.cdiv(T, BLOCK_T), D // GROUP)
    _quant_kernel[grid](x_TD, q_TD, scale_TG, T, x_TD.stride(0), q_TD.stride(0), scale_TG.stride(0),
                        BLOCK_T=BLOCK_T, GROUP=GROUP, FP8_MAX=FP8_MAX, EPS=EPS)
    return q_TD, scale_TG
