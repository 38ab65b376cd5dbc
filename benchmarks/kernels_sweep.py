"""The tile candidates benchmarks/kernels.py times per GEMM, and what fits on an SM: the shared memory a
candidate needs (estimated, to skip one whose programs cannot all be resident) and what its compiled kernel
holds (measured on the card, printed with its row).

A Hopper SM holds 228 KB of shared memory and 64K registers: a 4-warp program fits twice only under 256
registers a thread, an 8-warp one only under 128. Registers and shared memory quoted below are run 5's
(Triton 3.6 on the H200, benchmarks/BENCHMARKS.md).
"""

from moeplace.kernels.gemm_table import Backend, GemmConfig as C, GemmKind, fuses_swiglu

TMA, PF = dict(backend=Backend.triton_tma), dict(prefetch_scales=True)
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024  # Hopper; as in moeplace.kernels.grouped_gemm_kernels


def smem_estimate(kind: GemmKind, cfg: C) -> int:
    """Shared memory of one program in bytes: its pipeline (A and one weight tile a stage, two for SwiGLU)
    and an output tile for the epilogue's layout change (bf16 out; fp8 for SwiGLU). Compiled on the H200
    (run 5): m64 n128 s4 104 KB plain (estimate 112) and 168 SwiGLU (168); m128 n64 s4 104 (112); SwiGLU at
    64-column K steps s4 / s5 88 / 108 (88 / 108)."""
    swiglu = kind is GemmKind.swiglu
    stage = (cfg.block_m + cfg.block_n * (2 if swiglu else 1)) * cfg.block_k
    return cfg.num_stages * stage + cfg.block_m * cfg.block_n * (1 if swiglu else 2)


def takes(kind: GemmKind, cfg: C) -> bool:
    """Whether cfg is a SwiGLU candidate (every config is a plain one): the fused SwiGLU quantisation wants
    one 128-channel group per tile (and 256 rows of two accumulators spill); of the gluon tiles that cannot
    fuse it (the plain GEMM in bf16, then the SwiGLU kernel, as the torch loop) only the split ones are timed,
    the fastest plain tiles (run 7), to keep the sweep's time."""
    if kind is not GemmKind.swiglu or cfg.backend is Backend.torch_loop:
        return True
    if not fuses_swiglu(cfg):
        return cfg.split_m
    return cfg.block_n == 128 and cfg.block_m <= 128


def fits(kind: GemmKind, cfg: C) -> bool:
    """Whether cfg.programs_per_sm programs fit in one SM's shared memory (by the estimate). A persistent
    program that does not fit waits for another to exit: the grid then runs in two halves (59% of HBM for
    SwiGLU m64 s3 p2 in run 4, against 70-75% at one program)."""
    if not cfg.persistent or cfg.programs_per_sm == 1:
        return True
    return cfg.programs_per_sm * (smem_estimate(kind, cfg) + SMEM_RESERVED) <= SMEM_PER_SM


def sweep(rows_per_expert: float, smoke: bool) -> list[C]:
    """Candidates for a GEMM with this many rows per expert: what the ptxas report left standing (no
    register spills, or few) and what earlier runs did not rule out (benchmarks/BENCHMARKS.md, issue 17);
    the torch loop where the GEMMs are large."""
    loops = [C(backend=Backend.torch_loop)]  # 2-4 streams lost to one in run 3 (0.70-0.77x)
    if smoke:
        return [C(16, 128, 2, 4, 2), C(32, 128, 1, 4, 2, **TMA, **PF, programs_per_sm=2),
                C(16, 128, 1, 4, 2, **TMA, warp_specialize=True), C(16, 128, 1, 4, 3, **TMA, **PF, block_k=64),
                C(64, 128, 1, 8, 2, backend=Backend.gluon),  # on the CPU: the TMA kernel with its tile
                C(128, 128, 1, 8, 2, backend=Backend.gluon, split_m=True)]  # and SwiGLU after it (not fused)
    if rows_per_expert > 256:  # prefill at EP8: compute-bound
        return prefill_ep8() + loops
    if rows_per_expert > 64:  # prefill over all experts
        return [C(128, 128, 8, 8, 3, **TMA), C(128, 128, 8, 8, 3, **TMA, **PF), C(64, 128, 8, 8, 4, **PF),
                C(64, 128, 8, 4, 4, **PF), C(128, 128, 16, 8, 4, **PF), loops[0]]
    if rows_per_expert > 16:  # decode at EP8: weight streaming, one or two m-tiles per expert
        return decode_ep8()
    return [C(16, 64, 1, 4, 6), C(16, 128, 1, 4, 4), C(16, 128, 1, 4, 4, **PF), C(16, 128, 1, 4, 4, **TMA, **PF)]


def prefill_ep8() -> list[C]:
    """Run 3's winner (m128 n128 w8 s4: 213 registers x 256 threads, one program per SM whatever the shared
    memory) and two programs per SM at 4 warps (m64 n128 s4: 104 KB, 213 registers), which overlap one
    program's wgmma wait with the other's loads and MMAs the way DeepGEMM's two consumer warpgroups do:
    +7% at down in run 5, -1% at gate/up. Lost in run 5: m128 n64 p2 (-19 to -25%) and every 64-column K
    step (-24 to -32%; SwiGLU's at s4 p2 -23%)."""
    return [C(128, 128, 8, 8, 4, **TMA, **PF), C(64, 128, 8, 4, 4, **TMA, **PF, programs_per_sm=2)] + gluon_tiles(8)


def gluon_tiles(group_m: int) -> list[C]:
    """The Gluon kernel's tiles (grouped_gemm_gluon.py: a producer warp; every promotion but a tile's last
    beside a later K block's wgmma; the output tile through shared memory): m128 on two warpgroups (32 KB a
    stage, and 32 KB for the bf16 output tile), the same m128 tile in two 4-warp halves that share each
    stage (split: 16 KB of output tile a half; no meeting of all 8 warps), m64 on one (24 KB a stage), two m64
    consumers in a program (p2: their own tiles, a ring of 24 KB stages each), m64 with N split over two
    warpgroups (the only SwiGLU tile, 40 KB a stage). Gone after run 6 (BENCHMARKS.md): the kernel without
    a producer warp (6-20% slower than with), 4 or 8 K blocks a loop trip (register spills), one m64
    consumer a program (-9 to -16% against m128), two at s4 (out of shared memory with fp32 output). Run 7:
    the split tiles won every prefill GEMM (+2 to +18% over the same tile unsplit); split at s6 needs 256 KB
    with the fp32 output of the numerics check."""
    G = dict(backend=Backend.gluon)
    return [C(128, 128, g, 8, s, **G) for s in (4, 5) for g in (group_m, 2 * group_m)] \
        + [C(128, 128, g, 8, s, **G, split_m=True) for s in (4, 5) for g in (group_m, 2 * group_m)] \
        + [C(64, 128, group_m, 4, 3, **G, programs_per_sm=2)] + [C(64, 128, group_m, 8, s, **G) for s in (4, 5)]


def decode_ep8() -> list[C]:
    """One m64 program per SM stalls on every K block's wgmma + promotion (63-66% of HBM); a second resident
    program (p2) streams while the first waits (75% gate/up, 70% down in runs 4a and 5). SwiGLU's 40 KB
    stages fit one program per SM (w8 s4: 70.8-74.5%). Gone after run 4: m128 w8, s2, s3, m32 (mma.sync),
    n256 w8, p3 (a third 213-register 4-warp program never fits: 3 x 27K > 64K registers), n64, s5, the
    pointer kernel; after run 5: 64-column K steps, where two SwiGLU programs fit (88 KB) but run at 66%
    (s4) and 52% (s5), and the plain GEMMs lose 5-27 points at the same two programs per SM; after run 7: the
    split gluon m128 tiles (62-66% plain, 46-64% SwiGLU unfused)."""
    return [C(64, 128, 1, 4, 4, **TMA, **PF), C(64, 128, 1, 4, 4, **TMA, **PF, programs_per_sm=2),
            C(64, 128, 1, 8, 4, **TMA, **PF), C(64, 128, 1, 4, 3, backend=Backend.gluon, programs_per_sm=2),
            C(64, 128, 1, 8, 4, backend=Backend.gluon)]

def occupancy_note(kind: GemmKind, cfg: C, a, a_s, w, w_s, offsets) -> str:
    """What one program of this candidate's compiled kernel holds on the card, and how many fit an SM
    (one extra launch; "" for the torch loop and under the interpreter)."""
    import torch

    from moeplace.kernels.fp8_quant import FP8
    from moeplace.kernels.grouped_gemm_kernels import launch
    if cfg.backend is Backend.torch_loop:
        return ""
    swiglu = kind is GemmKind.swiglu and fuses_swiglu(cfg)  # else the plain GEMM is the kernel probed
    M, N = a.shape[0], w.shape[1] // (2 if swiglu else 1)
    c = torch.empty(M, N, dtype=FP8 if swiglu else torch.bfloat16, device=a.device)
    c_s = torch.empty(M, N // 128, dtype=torch.float32, device=a.device) if swiglu else c
    occ = launch(a, a_s, w, w_s, offsets, c, c_s, N, cfg, swiglu, report=True)
    return "" if occ is None else f"; {occ.note}"
