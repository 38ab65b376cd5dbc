"""The Triton kernels behind `grouped_gemm.py`: one program per tile (pointer loads), and a persistent,
TMA-fed one. Both compute, per 128-wide K block kb of an expert e's rows,
    acc += dot(a[:, kb], b[e][:, kb].T) * a_scale[row, kb] * b_scale[e, n // 128, kb]
and find their tiles on the device from the expert offsets (no host sync): expert e owns
cdiv(rows_e, BLOCK_M) consecutive m-tiles, so an empty expert costs nothing.
Dimensions: M = sorted rows, N = output features, K = reduction, E = experts.
"""

from dataclasses import dataclass

import torch

from moeplace.kernels._triton import HAS_GLUON, HAS_TRITON, tl, triton
from moeplace.kernels.fp8_quant import EPS, FP8_MAX, GROUP, quant_rows
from moeplace.kernels.gemm_table import Backend, GemmConfig, gluon_runs, gluon_warps

if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _expert_tiles(off_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert (vectors over E_P2): first row, end row, m-tiles, running end of the m-tiles."""
    e_idx = tl.arange(0, E_P2)
    lo = tl.load(off_ptr + e_idx, mask=e_idx < E, other=0)
    hi = tl.load(off_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    return e_idx, lo, hi, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def _locate(tile_m, e_idx, lo, hi, tiles, tiles_end, BLOCK_M: tl.constexpr):
    """(expert, first row, expert's end row) of m-tile `tile_m`."""
    e = tl.sum((tiles_end <= tile_m).to(tl.int32), axis=0)  # first expert whose tiles reach past tile_m
    mine = e_idx == e
    row_hi = tl.sum(tl.where(mine, hi, 0), axis=0)
    m0 = tl.sum(tl.where(mine, lo + (tile_m - tiles_end + tiles) * BLOCK_M, 0), axis=0)
    return e, m0, row_hi


@triton.jit
def _tile_coords(t, num_m, n_tiles, GROUP_M: tl.constexpr):
    """Grouped order over (m-tile, n-tile): GROUP_M m-tiles share each sweep of the n-tiles."""
    in_group = GROUP_M * n_tiles
    first_m = (t // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (t % in_group) % group_size, (t % in_group) // group_size


@triton.jit
def _load_scales(as_ptrs, bs_ptrs, kb, N, stride_bsn, SCALE_K: tl.constexpr, SWIGLU: tl.constexpr):
    """Scale block kb's scales (K columns [kb * SCALE_K, (kb + 1) * SCALE_K)): activations [BLOCK_M, 1],
    weights (a scalar, or [1, BLOCK_N] for wide tiles), and the up_proj rows' weights under SWIGLU (else
    the same as the weights')."""
    a_s = tl.load(as_ptrs + kb)[:, None]
    b_s = tl.load(bs_ptrs + kb)
    if SWIGLU:
        u_s = tl.load(bs_ptrs + (N // SCALE_K) * stride_bsn + kb)
    else:
        u_s = b_s
    return a_s, b_s, u_s


@triton.jit
def _epilogue(acc, acc_up, c_ptr, cs_ptr, rows, row_hi, cols, pid_n, stride_cm, stride_csm,
              SWIGLU: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    rows64 = rows.to(tl.int64)
    stored = (rows < row_hi)[:, None]
    if SWIGLU:  # SiLU(gate)·up, quantised per 128 channels straight from fp32: one group per row of the tile
        q, s = quant_rows(acc * tl.sigmoid(acc) * acc_up, FP8_MAX, EPS)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], q, mask=stored)
        tl.store(cs_ptr + rows64 * stride_csm + pid_n, s, mask=rows < row_hi)
    else:
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :], c, mask=stored)


@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, cs_ptr, off_ptr, N, K, num_m_bound,
                         stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                         stride_csm,
                         E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWIGLU: tl.constexpr,
                         PREFETCH: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # 1. tile and its expert; the grid is an upper bound, programs past the last tile exit at once
    tile_m, pid_n = _tile_coords(tl.program_id(0), num_m_bound, N // BLOCK_N, GROUP_M)
    e_idx, lo, hi, tiles, tiles_end = _expert_tiles(off_ptr, E, E_P2, BLOCK_M)
    if tile_m >= tl.max(tiles_end, axis=0):
        return
    e, m0, row_hi = _locate(tile_m, e_idx, lo, hi, tiles, tiles_end, BLOCK_M)
    # 2. main loop, one scale block of K per step
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
    last = K // BLOCK_K - 1
    a_s, b_s, u_s = _load_scales(as_ptrs, bs_ptrs, 0, N, stride_bsn, BLOCK_K, SWIGLU)
    for kb in range(0, K // BLOCK_K):
        # Triton leaves the scale loads unpipelined (a plain load, waited on by the promotion): PREFETCH
        # issues them a K block early. Two blocks ahead here stops Triton pipelining A and B (ptxas report).
        if PREFETCH:
            nxt = tl.minimum(kb + 1, last)
            a_s1, b_s1, u_s1 = _load_scales(as_ptrs, bs_ptrs, nxt, N, stride_bsn, BLOCK_K, SWIGLU)
        else:
            a_s, b_s, u_s = _load_scales(as_ptrs, bs_ptrs, kb, N, stride_bsn, BLOCK_K, SWIGLU)
        a = tl.load(a_ptrs)
        # (a_s * b_s) first: with a scalar b_s that is [BLOCK_M, 1], and the update one FMA per element
        acc += tl.dot(a, tl.load(b_ptrs)) * (a_s * b_s)
        if SWIGLU:
            acc_up += tl.dot(a, tl.load(b_ptrs + N * stride_bn)) * (a_s * u_s)
        if PREFETCH:
            a_s, b_s, u_s = a_s1, b_s1, u_s1
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # 3. epilogue
    _epilogue(acc, acc_up, c_ptr, cs_ptr, rows, row_hi, cols, pid_n, stride_cm, stride_csm, SWIGLU, FP8_MAX,
              EPS)


@triton.jit
def _persistent_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, N, K, N_W,
                       stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm,
                       E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SCALE_K: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_PROGS: tl.constexpr, SWIGLU: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                       PREFETCH: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # A [M, K] and B [E * N_W, K] arrive through TMA descriptors: rows past M read as zeros, rows past an
    # expert's end read the next expert's rows, and neither is ever stored. With BLOCK_N ≤ 128 one
    # weight-scale block covers a tile's columns and the promotion is one FMA per accumulator element.
    # A K step is BLOCK_K columns (SCALE_K or half of it): step ks lies in scale block
    # ks // (SCALE_K // BLOCK_K).
    e_idx, lo, hi, tiles, tiles_end = _expert_tiles(off_ptr, E, E_P2, BLOCK_M)
    num_m = tl.max(tiles_end, axis=0)
    n_tiles = N // BLOCK_N
    for t in tl.range(tl.program_id(0), num_m * n_tiles, NUM_PROGS, flatten=True,
                      warp_specialize=WARP_SPECIALIZE):
        tile_m, pid_n = _tile_coords(t, num_m, n_tiles, GROUP_M)
        e, m0, row_hi = _locate(tile_m, e_idx, lo, hi, tiles, tiles_end, BLOCK_M)
        rows = m0 + tl.arange(0, BLOCK_M)
        as_ptrs = as_ptr + tl.minimum(rows, row_hi - 1).to(tl.int64) * stride_asm
        if BLOCK_N <= SCALE_K:
            bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + (pid_n * BLOCK_N // SCALE_K) * stride_bsn
        else:  # a [1, BLOCK_N] row of the weight scales, one per column
            bs_cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) // SCALE_K
            bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse + bs_cols[None, :] * stride_bsn
        b_row = e * N_W + pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        last = K // BLOCK_K - 1
        a_s, b_s, u_s = _load_scales(as_ptrs, bs_ptrs, 0, N, stride_bsn, SCALE_K, SWIGLU)
        per_block = SCALE_K // BLOCK_K  # K steps per scale block
        nxt = tl.minimum(1, last) // per_block
        a_s1, b_s1, u_s1 = _load_scales(as_ptrs, bs_ptrs, nxt, N, stride_bsn, SCALE_K, SWIGLU)
        for ks in range(0, K // BLOCK_K):
            # as in the pointer kernel, but two K steps ahead (the TMA pipeline survives it); with 64-column
            # steps every scale is loaded twice, from L1 the second time
            if PREFETCH:
                nxt = tl.minimum(ks + 2, last) // per_block
                a_s2, b_s2, u_s2 = _load_scales(as_ptrs, bs_ptrs, nxt, N, stride_bsn, SCALE_K, SWIGLU)
            else:
                a_s, b_s, u_s = _load_scales(as_ptrs, bs_ptrs, ks // per_block, N, stride_bsn, SCALE_K, SWIGLU)
            a = a_desc.load([m0, ks * BLOCK_K])
            acc += tl.dot(a, b_desc.load([b_row, ks * BLOCK_K]).T) * (a_s * b_s)
            if SWIGLU:
                acc_up += tl.dot(a, b_desc.load([b_row + N, ks * BLOCK_K]).T) * (a_s * u_s)
            if PREFETCH:
                a_s, b_s, u_s, a_s1, b_s1, u_s1 = a_s1, b_s1, u_s1, a_s2, b_s2, u_s2
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, acc_up, c_ptr, cs_ptr, rows, row_hi, cols, pid_n, stride_cm, stride_csm, SWIGLU, FP8_MAX,
                  EPS)


# Hopper's SM (H100, H200): 228 KB of shared memory, of which each resident program also takes 1 KB the
# system reserves; 65,536 registers, given out per warp in units of 256 (CUDA occupancy calculator)
SMEM_PER_SM, SMEM_RESERVED, REGS_PER_SM, REG_UNIT = 228 * 1024, 1024, 65536, 256


@dataclass(frozen=True, slots=True)
class Occupancy:
    """What one compiled program of a launch holds on an SM, from the compiled kernel."""

    shared_bytes: int
    regs_per_thread: int
    spills: int  # registers spilled to local memory (ptxas)
    num_warps: int

    @property
    def per_sm(self) -> int:
        """Programs that fit on one SM at once: the lesser of shared memory's and registers' bound."""
        by_smem = SMEM_PER_SM // (self.shared_bytes + SMEM_RESERVED)
        warp_regs = -(-self.regs_per_thread * 32 // REG_UNIT) * REG_UNIT
        return min(by_smem, REGS_PER_SM // (warp_regs * self.num_warps))

    @property
    def note(self) -> str:
        spilled = f", {self.spills} spilled" if self.spills else ""
        return f"smem {self.shared_bytes / 1024:.0f} KB, {self.regs_per_thread} regs{spilled}: {self.per_sm}/SM"


def _occupancy(kernel, num_warps: int) -> Occupancy | None:
    """From the compiled kernel a Triton launch returns (None under the interpreter)."""
    if getattr(kernel, "n_regs", None) is None:
        return None
    return Occupancy(kernel.metadata.shared, kernel.n_regs, getattr(kernel, "n_spills", 0), num_warps)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def tma_ready(a_MK: torch.Tensor, b_ENK: torch.Tensor) -> bool:
    """Whether TMA can read these operands: 16-byte aligned bases and row strides, and experts' weights
    packed back to back (one [E * N, K] view)."""
    E, N, K = b_ENK.shape
    return (a_MK.data_ptr() % 16 == 0 and a_MK.stride(0) % 16 == 0 and b_ENK.data_ptr() % 16 == 0
            and b_ENK.stride(1) % 16 == 0 and b_ENK.stride(0) == N * b_ENK.stride(1))


def launch(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c, c_scale, N_out: int,
           cfg: GemmConfig, swiglu: bool, report: bool = False) -> Occupancy | None:
    """Run one Triton grouped GEMM into c (and c_scale with the SwiGLU epilogue): the Gluon kernel where cfg
    asks for it on Hopper, the persistent TMA kernel where cfg asks for a persistent kernel and the operands
    allow it, else the pointer kernel. With `report` (the benchmark's probe), returns what one
    program of it holds on an SM (None under the interpreter or for M = 0); else None."""
    (M, K), (E, N_w, _) = a_MK.shape, b_ENK.shape
    assert N_out % cfg.block_n == 0, f"N={N_out} is not a multiple of block_n={cfg.block_n}"
    if M == 0:
        return None
    # every expert adds at most one partly filled m-tile, and at most min(E, M) experts have rows
    num_m_bound = triton.cdiv(M, cfg.block_m) + min(E, M)
    hopper = a_MK.is_cuda and torch.cuda.get_device_capability(a_MK.device)[0] == 9
    if cfg.backend is Backend.gluon and HAS_GLUON and hopper and tma_ready(a_MK, b_ENK) and gluon_runs(K):
        from moeplace.kernels.grouped_gemm_gluon import launch_gluon  # it imports this module's tile helpers
        kernel = launch_gluon(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c, c_scale, N_out, cfg,
                              swiglu, _num_sms(a_MK.device))
        return _occupancy(kernel, gluon_warps(cfg)) if report else None
    common = dict(E_P2=triton.next_power_of_2(E), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                  SWIGLU=swiglu, PREFETCH=cfg.prefetch_scales, FP8_MAX=FP8_MAX, EPS=EPS, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    # the gluon kernel's tile elsewhere (not Hopper, no Gluon, operands TMA cannot read, an odd number of K
    # blocks) runs in the TMA one
    if cfg.persistent and tma_ready(a_MK, b_ENK):
        progs = min(_num_sms(a_MK.device) * cfg.programs_per_sm, num_m_bound * (N_out // cfg.block_n))
        a_desc = TensorDescriptor(a_MK, [M, K], [a_MK.stride(0), 1], [cfg.block_m, cfg.block_k])
        b_desc = TensorDescriptor(b_ENK, [E * N_w, K], [b_ENK.stride(1), 1], [cfg.block_n, cfg.block_k])
        kernel = _persistent_kernel[(progs,)](
            a_desc, a_scale_MKb, b_desc, b_scale_ENbKb, c, c_scale, expert_offsets_E1, N_out, K, N_w,
            a_scale_MKb.stride(0), b_scale_ENbKb.stride(0), b_scale_ENbKb.stride(1), c.stride(0),
            c_scale.stride(0), E, BLOCK_K=cfg.block_k, SCALE_K=GROUP, NUM_PROGS=progs,
            WARP_SPECIALIZE=cfg.warp_specialize, **common)
        return _occupancy(kernel, cfg.num_warps) if report else None
    # the pointer kernel steps one scale block at a time whatever cfg.block_k says (a TMA config whose
    # operands TMA cannot read runs here)
    kernel = _grouped_gemm_kernel[(num_m_bound * (N_out // cfg.block_n),)](
        a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, c, c_scale, expert_offsets_E1, N_out, K, num_m_bound,
        a_MK.stride(0), a_scale_MKb.stride(0), b_ENK.stride(0), b_ENK.stride(1), b_scale_ENbKb.stride(0),
        b_scale_ENbKb.stride(1), c.stride(0), c_scale.stride(0), E, BLOCK_K=GROUP, **common)
    return _occupancy(kernel, cfg.num_warps) if report else None
