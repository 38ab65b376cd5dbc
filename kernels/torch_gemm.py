"""The grouped GEMM through torch's own block-scaled `_scaled_mm` (cuBLAS), one call per expert.

torch 2.11's grouped scaled GEMM (`_scaled_grouped_mm`, `F.scaled_grouped_mm`) takes row-wise, MXFP8 and
NVFP4 scales only, not DeepSeek's 1×128 / 128×128 blocks, while `_scaled_mm` takes those blocks on
Hopper (its `block_1x128_128x128` recipe): so a loop over experts. The loop needs every expert's row
count on the host: from the caller where it holds them (the EP path's all_to_all sizes), else one
device-to-host sync per call; the dispatcher never picks it while a CUDA graph is being captured. The
GEMMs may be spread over several CUDA streams: ~1,000 rows × 4,096 columns is about two waves of tiles
on 132 SMs, and the last, partial wave of one expert can overlap the next expert's first.
Dimensions: M = sorted rows, N = output features, K = reduction, E = experts, X = non-empty experts.
"""

import itertools
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from moeplace.kernels._triton import tl, triton
from moeplace.kernels.fp8_quant import EPS, FP8, FP8_MAX, GROUP, quant_rows

ROW_ALIGN = 4  # cuBLAS wants each call's rows (and its 1×128 scales' leading dimension) a multiple of 4


def expert_spans(offsets_E1: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows, in expert order."""
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(offsets_E1[:-1], offsets_E1[1:])) if hi > lo]


def check_host_offsets(offsets_host: Sequence[int], E: int, M: int) -> list[int]:
    """The caller's host copy of the expert offsets as a list, checked for shape and order (not against the
    device copy: that would be the very sync it saves)."""
    off = [int(o) for o in offsets_host]
    assert len(off) == E + 1, f"expert_offsets_host has {len(off)} entries, want E + 1 = {E + 1}"
    assert off[0] >= 0 and off[-1] <= M and all(lo <= hi for lo, hi in zip(off[:-1], off[1:])), \
        f"expert_offsets_host must be non-decreasing within [0, M={M}], got {off[:4]}...{off[-2:]}"
    return off


def stream_lanes(rows_X: Sequence[int], lanes: int) -> list[list[int]]:
    """Which of the X non-empty experts' GEMMs (rows_X[x] rows each, in expert order) each of `lanes`
    streams runs, in the order it runs them.

    An expert whose rows are not a multiple of ROW_ALIGN is padded into the next expert's first rows
    (garbage there until that expert writes them): so such an expert and the next share a chain, run in
    order on one stream. Chains go largest first to the lane with the fewest rows so far (LPT)."""
    chains, open_chain = [], False
    for x, n in enumerate(rows_X):
        if open_chain:
            chains[-1].append(x)
        else:
            chains.append([x])
        open_chain = n % ROW_ALIGN != 0
    out, load = [[] for _ in range(lanes)], [0] * lanes
    for chain in sorted(chains, key=lambda c: -sum(rows_X[x] for x in c)):
        lane = load.index(min(load))
        out[lane] += chain
        load[lane] += sum(rows_X[x] for x in chain)
    return [sorted(lane) for lane in out]  # a lane's chains in expert order: each chain stays in order


@lru_cache(maxsize=None)
def _side_streams(device: torch.device, n: int) -> tuple[torch.cuda.Stream, ...]:
    return tuple(torch.cuda.Stream(device) for _ in range(n))


def _run_lanes(gemm: Callable[[int], None], lanes: list[list[int]], device: torch.device) -> None:
    """gemm(x) for the x of each lane on its own stream (lane 0: the caller's), issued round robin so the
    GPU sees every lane's next GEMM early. The side streams wait for the caller's stream first and the
    caller's stream waits for them last, so every tensor they touch (all allocated on the caller's
    stream) is safe to free and reuse there after return without record_stream."""
    if len(lanes) == 1 or device.type != "cuda":
        for x in sorted(x for lane in lanes for x in lane):
            gemm(x)
        return
    main = torch.cuda.current_stream(device)
    streams = (main, *_side_streams(device, len(lanes) - 1))
    for s in streams[1:]:
        s.wait_stream(main)
    for step in range(max(len(lane) for lane in lanes)):
        for lane, s in zip(lanes, streams):
            if step < len(lane):
                with torch.cuda.stream(s):
                    gemm(lane[step])
    for s in streams[1:]:
        main.wait_stream(s)


@triton.jit
def _scales_by_expert_kernel(as_ptr, off_ptr, out_ptr, stride_asm, E, Kb, E_P2: tl.constexpr,
                             KB_P2: tl.constexpr, BLOCK_M: tl.constexpr, ROW_ALIGN: tl.constexpr):
    # program e: expert e's 1×128 scales, rows padded to ROW_ALIGN (padding 1.0), stored [Kb, m_pad]
    # contiguous at Kb * (padded rows of the experts before it): the outer-dim-major layout cuBLAS reads
    e = tl.program_id(0)
    idx = tl.arange(0, E_P2)
    m_pad = (tl.load(off_ptr + idx + 1, mask=idx < E, other=0) - tl.load(off_ptr + idx, mask=idx < E, other=0)
             + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    base = tl.sum(tl.where(idx < e, m_pad, 0), axis=0) * Kb
    mine = tl.sum(tl.where(idx == e, m_pad, 0), axis=0)
    lo, hi = tl.load(off_ptr + e), tl.load(off_ptr + e + 1)
    ks = tl.arange(0, KB_P2)
    for r0 in range(0, mine, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        s = tl.load(as_ptr + (lo + r).to(tl.int64)[:, None] * stride_asm + ks[None, :],
                    mask=(lo + r < hi)[:, None] & (ks < Kb)[None, :], other=1.0)
        mask = (r < mine)[:, None] & (ks < Kb)[None, :]
        tl.store(out_ptr + base + ks[None, :] * mine + r[:, None], s, mask=mask)


def _scales_by_expert(a_scale_MKb: torch.Tensor, expert_offsets_E1: torch.Tensor) -> torch.Tensor:
    """[Kb * (M + E * (ROW_ALIGN - 1))] float32: every expert's scales transposed and padded, one launch."""
    (M, Kb), E = a_scale_MKb.shape, expert_offsets_E1.numel() - 1
    out = torch.empty(Kb * (M + E * (ROW_ALIGN - 1)), dtype=torch.float32, device=a_scale_MKb.device)
    _scales_by_expert_kernel[(E,)](a_scale_MKb, expert_offsets_E1, out, a_scale_MKb.stride(0), E, Kb,
                                   E_P2=triton.next_power_of_2(E), KB_P2=triton.next_power_of_2(Kb), BLOCK_M=64,
                                   ROW_ALIGN=ROW_ALIGN)
    return out


def grouped_gemm_torch(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, b_ENK: torch.Tensor,
                       b_scale_ENbKb: torch.Tensor, expert_offsets_E1: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, offsets_host: Sequence[int] | None = None,
                       streams: int = 1) -> torch.Tensor:
    """Same contract as `grouped_gemm_fp8` (operands checked there): [M, N] out_dtype, except that rows
    from expert_offsets_E1[E] on may be written (with the products of whatever those rows hold).
    `offsets_host`: the same offsets as host ints, if the caller has them (then no host sync here).
    Each expert's rows are padded to a multiple of ROW_ALIGN in place: the next expert's rows (whose
    results that expert overwrites next, on the same stream: `stream_lanes`), or zero rows past the
    last expert's end (the spare rows there may hold anything, NaN bytes included)."""
    (M, K), (E, N, _), Kb = a_MK.shape, b_ENK.shape, a_scale_MKb.shape[1]
    a_MK = a_MK.contiguous()  # rows may arrive as strided views of wire rows (runtime/experts.py)
    scales = _scales_by_expert(a_scale_MKb, expert_offsets_E1)
    c_pad = torch.empty(M + ROW_ALIGN, N, dtype=out_dtype, device=a_MK.device)
    # the loop's trip count and slices need the counts on the host: without offsets_host, one sync
    off = expert_offsets_E1.tolist() if offsets_host is None else check_host_offsets(offsets_host, E, M)
    spans = expert_spans(off)
    rows_X = [hi - lo + (-(hi - lo)) % ROW_ALIGN for _, lo, hi in spans]
    base_X = list(itertools.accumulate((Kb * m for m in rows_X), initial=0))
    end = off[-1]
    tails = {x: torch.cat([a_MK[lo:end], a_MK.new_zeros(lo + m - end, K)])  # before any side stream starts
             for x, ((_, lo, _), m) in enumerate(zip(spans, rows_X)) if lo + m > end}
    b_EKN, b_scale_EKbNb = b_ENK.transpose(1, 2), b_scale_ENbKb.transpose(1, 2)  # what cuBLAS takes, per e

    def gemm(x: int) -> None:  # built where it is issued: a sync-bound call gets its first GEMM out sooner
        (e, lo, _), m = spans[x], rows_X[x]
        a = tails[x] if x in tails else a_MK[lo:lo + m]
        s = scales.as_strided((m, Kb), (1, m), base_X[x])  # [m, Kb] outer-dim-major, as cuBLAS checks
        torch._scaled_mm(a, b_EKN[e], s, b_scale_EKbNb[e], out_dtype=out_dtype, out=c_pad[lo:lo + m])

    _run_lanes(gemm, stream_lanes([hi - lo for _, lo, hi in spans], streams), a_MK.device)
    return c_pad[:M]


@triton.jit
def _swiglu_quant_kernel(h_ptr, q_ptr, s_ptr, end_ptr, M, F, stride_hm, stride_qm, stride_sm, HAS_END: tl.constexpr,
                         BLOCK_M: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # program (i, g): rows [i*BLOCK_M, (i+1)*BLOCK_M), output channel group g (gate cols g, up cols F + g)
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * GROUP + tl.arange(0, GROUP)
    if HAS_END:
        M = tl.minimum(M, tl.load(end_ptr))
    mask = (rows < M)[:, None]
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    q, s = quant_rows(gate * tl.sigmoid(gate) * up, FP8_MAX, EPS)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + g, s, mask=rows < M)


def swiglu_quant(h_M2F: torch.Tensor, rows_end: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate)·up of a [M, 2F] gate|up product, quantised per 128 channels:
    (g_MF [M, F] float8_e4m3fn, g_scale [M, F/128] float32). `rows_end`: a one-element int32 tensor on the
    device (the expert offsets' last), from which row on the outputs are left unwritten (no host sync)."""
    M, F2 = h_M2F.shape
    assert F2 % (2 * GROUP) == 0 and h_M2F.stride(1) == 1, f"h_M2F must be [M, 2F], 2F a multiple of 256: {F2}"
    g_MF = torch.empty(M, F2 // 2, dtype=FP8, device=h_M2F.device)
    g_scale = torch.empty(M, F2 // 2 // GROUP, dtype=torch.float32, device=h_M2F.device)
    BLOCK_M = 16
    if M:
        _swiglu_quant_kernel[(triton.cdiv(M, BLOCK_M), F2 // 2 // GROUP)](
            h_M2F, g_MF, g_scale, h_M2F if rows_end is None else rows_end, M, F2 // 2, h_M2F.stride(0),
            g_MF.stride(0), g_scale.stride(0), HAS_END=rows_end is not None, BLOCK_M=BLOCK_M, GROUP=GROUP,
            FP8_MAX=FP8_MAX, EPS=EPS)
    return g_MF, g_scale
