"""FP8 block-scaled grouped GEMM over rows grouped by expert (DeepSeek-V3 expert weights).

Rows of `a` are sorted by expert (see permute.py): expert e owns rows [off[e], off[e+1]). Each expert's
rows multiply that expert's weight: c[rows_e] = a[rows_e] @ b[e].T, with the exact block-scaled
semantics, per 128-wide K block kb:
    acc += dot(a[:, kb], b[e][:, kb].T) * a_scale[row, kb] * b_scale[e, n // 128, kb]
The tile schedule is computed inside the kernel from the offsets (on device, no host sync): expert e owns
cdiv(rows_e, BLOCK_M) consecutive m-tiles, so an empty expert costs nothing and a hot one gets as many
tiles as it needs; the launch grid is an upper bound and programs past the last tile exit at once.
Dimensions: M = sorted rows, N = output features, K = reduction, E = experts, Kb = K // 128, Nb = N // 128.
"""

from dataclasses import dataclass

import torch

from moeplace.kernels._triton import require_triton, tl, triton
from moeplace.kernels.fp8_quant import (EPS, FP8, FP8_MAX, GROUP, dequant_rows_ref, dequant_weight_blocks_ref,
                                        per_token_group_quant_fp8_ref, quant_rows)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 128
    group_m: int = 8  # m-tiles walked together, so neighbouring programs share A rows and B columns in L2
    num_warps: int = 4
    num_stages: int = 4


def default_config(rows_per_expert: float) -> GemmConfig:
    """Tiles from the H100 sweep in benchmarks/BENCHMARKS.md (each within ~2% of that shape's best)."""
    if rows_per_expert <= 16:  # decode over many experts: a few rows each, pure weight streaming
        return GemmConfig(block_m=16, block_n=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:  # decode at EP8
        return GemmConfig(block_m=64, block_n=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 256:  # prefill over many experts: ~1-2 m-tiles each
        return GemmConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4)
    return GemmConfig(block_m=128, block_n=128, group_m=16, num_warps=8, num_stages=4)


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, cs_ptr, off_ptr, N, K, num_m_bound,
                         stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm, stride_csm,
                         E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWIGLU: tl.constexpr,
                         FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    pid = tl.program_id(0)
    # 1. tile: grouped order over (m-tile, n-tile)
    in_group = GROUP_M * (N // BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m_bound - first_m, GROUP_M)
    tile_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    # 2. expert of the m-tile, from the offsets
    e_idx = tl.arange(0, E_P2)
    lo = tl.load(off_ptr + e_idx, mask=e_idx < E, other=0)
    hi = tl.load(off_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    if tile_m >= tl.max(tiles_end, axis=0):
        return
    e = tl.sum((tiles_end <= tile_m).to(tl.int32), axis=0)  # first expert whose tiles reach past tile_m
    mine = e_idx == e
    row_hi = tl.sum(tl.where(mine, hi, 0), axis=0)
    m0 = tl.sum(tl.where(mine, lo + (tile_m - tiles_end + tiles) * BLOCK_M, 0), axis=0)
    # 3. main loop, one scale block of K per step
    rows = m0 + tl.arange(0, BLOCK_M)
    # rows past the expert's end re-read its last row (in bounds, no mask on the hot loads); never stored
    rows_ld = tl.minimum(rows, row_hi - 1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + cols[None, :] * stride_bn + ks[:, None]
    as_ptrs = as_ptr + rows_ld * stride_asm
    if BLOCK_N <= BLOCK_K:  # the tile sits in one weight-scale block: one scale per K step, not per column
        bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
    else:
        bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + (cols // BLOCK_K)[None, :] * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SWIGLU: the up_proj half, weight rows N + cols
    for kb in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        a_s = tl.load(as_ptrs + kb)[:, None]
        # (a_s * b_s) first: with a scalar b_s that is [BLOCK_M, 1], and the update one FMA per element
        acc += tl.dot(a, tl.load(b_ptrs)) * (a_s * tl.load(bs_ptrs + kb))
        if SWIGLU:
            up = tl.dot(a, tl.load(b_ptrs + N * stride_bn))
            acc_up += up * (a_s * tl.load(bs_ptrs + (N // BLOCK_K) * stride_bsn + kb))
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # 4. epilogue
    rows64 = rows.to(tl.int64)
    stored = (rows < row_hi)[:, None]
    if SWIGLU:  # SiLU(gate)·up, quantised per 128 channels straight from fp32: one group per row of the tile
        q, s = quant_rows(acc * tl.sigmoid(acc) * acc_up, FP8_MAX, EPS)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], q, mask=stored)
        tl.store(cs_ptr + rows64 * stride_csm + pid_n, s, mask=rows < row_hi)
    else:
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=stored)


def check_grouped_operands(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1) -> None:
    assert a_MK.dim() == 2 and a_MK.dtype == FP8, f"a_MK must be [M, K] float8_e4m3fn, got {tuple(a_MK.shape)} {a_MK.dtype}"
    M, K = a_MK.shape
    assert b_ENK.dim() == 3 and b_ENK.dtype == FP8, f"b_ENK must be [E, N, K] float8_e4m3fn, got {tuple(b_ENK.shape)} {b_ENK.dtype}"
    E, N, Kb_ = b_ENK.shape
    assert Kb_ == K, f"K of a_MK ({K}) != K of b_ENK ({Kb_})"
    assert K % GROUP == 0 and N % GROUP == 0, f"N={N} and K={K} must be multiples of {GROUP}"
    assert a_scale_MKb.shape == (M, K // GROUP) and a_scale_MKb.dtype == torch.float32, \
        f"a_scale_MKb must be [{M}, {K // GROUP}] float32, got {tuple(a_scale_MKb.shape)} {a_scale_MKb.dtype}"
    assert b_scale_ENbKb.shape == (E, N // GROUP, K // GROUP) and b_scale_ENbKb.dtype == torch.float32, \
        f"b_scale_ENbKb must be [{E}, {N // GROUP}, {K // GROUP}] float32, got {tuple(b_scale_ENbKb.shape)} {b_scale_ENbKb.dtype}"
    assert expert_offsets_E1.shape == (E + 1,) and expert_offsets_E1.dtype == torch.int32, \
        f"expert_offsets_E1 must be [{E + 1}] int32, got {tuple(expert_offsets_E1.shape)} {expert_offsets_E1.dtype}"
    for name, t in (("a_MK", a_MK), ("a_scale_MKb", a_scale_MKb), ("b_ENK", b_ENK), ("b_scale_ENbKb", b_scale_ENbKb)):
        assert t.stride(-1) == 1, f"{name}: last dimension must be contiguous, strides {t.stride()}"
        assert t.device == a_MK.device, f"{name} on {t.device}, a_MK on {a_MK.device}"
    assert expert_offsets_E1.is_contiguous() and expert_offsets_E1.device == a_MK.device, \
        f"expert_offsets_E1 must be contiguous on {a_MK.device}"


def _launch(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c, c_scale, N_out, cfg, swiglu):
    (M, K), E = a_MK.shape, b_ENK.shape[0]
    assert N_out % cfg.block_n == 0, f"N={N_out} is not a multiple of block_n={cfg.block_n}"
    # every expert adds at most one partly filled m-tile, and at most min(E, M) experts have rows
    num_m_bound = triton.cdiv(M, cfg.block_m) + min(E, M)
    if M == 0:
        return
    _grouped_gemm_kernel[(num_m_bound * (N_out // cfg.block_n),)](
        a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, c, c_scale, expert_offsets_E1, N_out, K, num_m_bound,
        a_MK.stride(0), a_scale_MKb.stride(0), b_ENK.stride(0), b_ENK.stride(1), b_scale_ENbKb.stride(0),
        b_scale_ENbKb.stride(1), c.stride(0), c_scale.stride(0), E, E_P2=triton.next_power_of_2(E),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=GROUP, GROUP_M=cfg.group_m, SWIGLU=swiglu,
        FP8_MAX=FP8_MAX, EPS=EPS, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def grouped_gemm_fp8(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, b_ENK: torch.Tensor, b_scale_ENbKb: torch.Tensor,
                     expert_offsets_E1: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                     config: GemmConfig | None = None) -> torch.Tensor:
    """a_MK [M, K] fp8 with a_scale_MKb [M, K/128] f32 (rows sorted by expert), b_ENK [E, N, K] fp8 with
    b_scale_ENbKb [E, N/128, K/128] f32, expert_offsets_E1 [E + 1] int32 → c_MN [M, N] out_dtype.
    Rows from expert_offsets_E1[E] on are left unwritten."""
    require_triton()
    check_grouped_operands(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1)
    (M, _), (E, N, _) = a_MK.shape, b_ENK.shape
    assert out_dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported out_dtype {out_dtype}"
    c_MN = torch.empty(M, N, dtype=out_dtype, device=a_MK.device)
    _launch(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c_MN, c_MN, N,
            config or default_config(M / E), swiglu=False)
    return c_MN


def grouped_gemm_swiglu_fp8(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, w13_E2FK: torch.Tensor,
                            w13_scale: torch.Tensor, expert_offsets_E1: torch.Tensor,
                            config: GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate/up GEMM with SiLU(gate)·up and FP8 requantisation fused into the epilogue (no bf16 round trip):
    w13_E2FK [E, 2F, K] fp8 (rows [0, F) gate, [F, 2F) up) with w13_scale [E, 2F/128, K/128] →
    (g_MF [M, F] float8_e4m3fn, g_scale_MFb [M, F/128] float32), rows past the last expert unwritten."""
    require_triton()
    check_grouped_operands(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1)
    (M, _), (E, F2, _) = a_MK.shape, w13_E2FK.shape
    assert F2 % (2 * GROUP) == 0, f"w13_E2FK: 2F={F2} must be a multiple of {2 * GROUP}"
    cfg = config or default_config(M / E)
    assert cfg.block_n == GROUP, f"the fused epilogue quantises one {GROUP}-channel group per tile: block_n={cfg.block_n}"
    g_MF = torch.empty(M, F2 // 2, dtype=FP8, device=a_MK.device)
    g_scale_MFb = torch.empty(M, F2 // 2 // GROUP, dtype=torch.float32, device=a_MK.device)
    _launch(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1, g_MF, g_scale_MFb, F2 // 2, cfg, swiglu=True)
    return g_MF, g_scale_MFb


def grouped_gemm_ref(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, b_ENK: torch.Tensor, b_scale_ENbKb: torch.Tensor,
                     expert_offsets_E1: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference in float64: [M, N], rows that belong to no expert are zero."""
    check_grouped_operands(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1)
    a = dequant_rows_ref(a_MK, a_scale_MKb)
    c = torch.zeros(a_MK.shape[0], b_ENK.shape[1], dtype=torch.float64, device=a_MK.device)
    offsets = expert_offsets_E1.tolist()
    for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        if hi > lo:
            c[lo:hi] = a[lo:hi] @ dequant_weight_blocks_ref(b_ENK[e], b_scale_ENbKb[e]).T
    return c


def swiglu_quant_ref(h_M2F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate)·up of a [M, 2F] gate|up product, quantised per 128 channels (float32 like the kernel)."""
    F = h_M2F.shape[1] // 2
    return per_token_group_quant_fp8_ref((torch.nn.functional.silu(h_M2F[:, :F]) * h_M2F[:, F:]).float())


def grouped_gemm_swiglu_ref(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, w13_E2FK: torch.Tensor,
                            w13_scale: torch.Tensor, expert_offsets_E1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `grouped_gemm_swiglu_fp8` (product in float64)."""
    return swiglu_quant_ref(grouped_gemm_ref(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1))
