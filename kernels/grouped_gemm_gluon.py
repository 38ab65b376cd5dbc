"""The Hopper grouped FP8 GEMM in Gluon (Triton's explicit-layout language): the prefill kernel whose
block-scale promotion runs while the tensor cores work on a later K block.

Each 128-column K block kb of an expert e's rows adds its own product with its own scales,
    acc += (a[:, kb] @ b[e][:, kb].T) · a_scale[row, kb] · b_scale[e, n // 128, kb],
so the product of one block must be read out of the tensor cores before the next block's is added.
Triton 3.6 compiles that as `wgmma`, `wait 0`, promotion FMAs, next `wgmma`: the tensor cores idle through
every promotion (benchmarks/BENCHMARKS.md, issue 17, from the compiled code). Here the waits are placed by
hand: each K block's wgmma goes into a fresh partial accumulator, two sets of partials take alternate
blocks, and a block is promoted while a later block's wgmma runs (`warpgroup_mma_wait(num_outstanding=...)`
lets the newer one run). Registers: an accumulator and two partials a thread (under SwiGLU twice that,
so its tiles split N over two warpgroups).

A producer warp (warp specialisation) walks the same tiles and streams their K blocks by TMA into a ring
of STAGES shared-memory slots, STAGES blocks ahead of the tensor cores and across tile boundaries; the
consumer warps hand each slot back through an mbarrier once its wgmma is done. With programs_per_sm = 2 a
program holds two consumer warpgroups, each with its own tiles and ring, so that one's waits and
epilogues are the other's tensor-core time (DeepGEMM's two math warpgroups; here they work on different
tiles). With split_m the two 4-warp consumers take the two 64-row halves of each 128-row tile from one ring
and hand its slots back each on its own, so the 8 warps never meet at a barrier and drift out of step (one
promotes while the other's wgmma runs); a half past its expert's end skips its wgmma (the fastest prefill
tiles: BENCHMARKS.md, run 7). Tiles are found on the device from the expert offsets, as in the Triton
kernels (no host sync; an empty expert costs nothing). The pieces of a K step are in gluon_steps.py.
Dimensions: M = sorted rows, N = output features, K = reduction, E = experts.
"""

from moeplace.kernels._triton import HAS_GLUON, gl, gluon, triton
from moeplace.kernels.fp8_quant import EPS, FP8_MAX, GROUP, quant_rows
from moeplace.kernels.gemm_table import GemmConfig, gluon_runs, gluon_takes
from moeplace.kernels.gluon_steps import _acc_layout, _expert_tiles, _issue, _load_step, _mine, _promote, \
    _ready, _release, _scales, _store_tile, _tile, _wait

if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _load_warp(a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, off_ptr, N, K, N_W, E, E_P2: gl.constexpr,
               GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
               SWIGLU: gl.constexpr):
    """The producer warp: walks each consumer's tiles and K steps in that consumer's order, one step
    for each consumer in turn, each into the consumer's own ring of slots."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    STRIDE: gl.constexpr = NUM_PROGS * CONSUMERS
    one_warp: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    e_idx, lo, hi, tiles, tiles_end = _expert_tiles(off_ptr, E, E_P2, BLOCK_M, one_warp)
    num_m = gl.max(tiles_end, 0)
    n_tiles = N // BLOCK_N
    first = gl.program_id(0) * CONSUMERS  # consumer 0's id; consumer 1 (if any) takes the next tile each time
    p = 0
    for i in range(_mine(num_m * n_tiles, first, STRIDE)):  # consumer 0 has at least consumer 1's tiles
        e, m0, _, pid_n = _tile(first, i, e_idx, lo, hi, tiles, tiles_end, num_m, n_tiles, STRIDE, GROUP_M, BLOCK_M)
        b_row = e * N_W + pid_n * BLOCK_N
        if CONSUMERS == 2:
            live1 = i < _mine(num_m * n_tiles, first + 1, STRIDE)
            e1, m1, _, pid_n1 = _tile(first + 1, i, e_idx, lo, hi, tiles, tiles_end, num_m, n_tiles, STRIDE,
                                      GROUP_M, BLOCK_M)
            b_row1 = e1 * N_W + pid_n1 * BLOCK_N
        for ks in range(K // BLOCK_K):
            _load_step(0, p, True, m0, b_row, ks, N, a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, STAGES,
                       SWIGLU)
            if CONSUMERS == 2:
                _load_step(1, p, live1, m1, b_row1, ks, N, a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty,
                           STAGES, SWIGLU)
            p += 1


@gluon.jit
def _consume(a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, a_bufs, b_bufs, u_bufs, ready, empty, N, K,
             N_W, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, E, E_P2: gl.constexpr,
             GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr, CONSUMERS: gl.constexpr, HALVES: gl.constexpr,
             PART: gl.constexpr, STAGES: gl.constexpr, SWIGLU: gl.constexpr, FP8_MAX: gl.constexpr,
             EPS: gl.constexpr):
    """A consumer (one or two tensor-core warpgroups), the program's PART-th: its tiles' K steps and
    epilogues, from its ring of slots, which the producer warp fills. With two consumers a program
    (CONSUMERS = 2) PART is its tiles and ring; with a tile in two halves (HALVES = 2) the half of each
    tile's rows it takes, from the one ring."""
    TILE_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = TILE_M // HALVES  # this consumer's rows of a tile
    RING: gl.constexpr = PART if CONSUMERS == 2 else 0
    HALF: gl.constexpr = PART if HALVES == 2 else 0
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    num_warps: gl.constexpr = gl.num_warps()
    acc_l: gl.constexpr = _acc_layout(BLOCK_M, BLOCK_N, num_warps)

    vec_l: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    e_idx, lo, hi, tiles, tiles_end = _expert_tiles(off_ptr, E, E_P2, TILE_M, vec_l)
    num_m = gl.max(tiles_end, 0)
    n_tiles = N // BLOCK_N
    pid = gl.program_id(0)
    STRIDE: gl.constexpr = NUM_PROGS * CONSUMERS
    cid = pid * CONSUMERS + RING
    my_tiles = _mine(num_m * n_tiles, cid, STRIDE)
    nk = K // BLOCK_K

    c = 0  # K steps consumed by this program
    for i in range(my_tiles):
        e, m0, row_hi, pid_n = _tile(cid, i, e_idx, lo, hi, tiles, tiles_end, num_m, n_tiles, STRIDE, GROUP_M,
                                     TILE_M)
        m0 += HALF * BLOCK_M
        if m0 < row_hi:
            c = _tile_k_loop(c, m0, row_hi, pid_n, e, as_ptr, bs_ptr, c_ptr, cs_ptr, a_bufs, b_bufs, u_bufs, ready,
                             empty, nk, n_tiles, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, acc_l,
                             RING, HALF, HALVES, STAGES, SWIGLU, FP8_MAX, EPS)
        else:  # no row of the expert in this half (HALVES = 2): its slots are handed back all the same
            for j in range(0, nk // 2):
                _ready(c, ready, RING, STAGES)
                _ready(c + 1, ready, RING, STAGES)
                _release(c, empty, RING, STAGES)
                c += 2


@gluon.jit
def _tile_k_loop(c, m0, row_hi, pid_n, e, as_ptr, bs_ptr, c_ptr, cs_ptr, a_bufs, b_bufs, u_bufs, ready, empty, nk,
                 n_tiles, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, acc_l: gl.constexpr,
                 RING: gl.constexpr, HALF: gl.constexpr, HALVES: gl.constexpr, STAGES: gl.constexpr,
                 SWIGLU: gl.constexpr, FP8_MAX: gl.constexpr, EPS: gl.constexpr):
    """One tile's (or half tile's) K steps from step c of the ring on, and its epilogue: rows m0.. (those
    before row_hi) of expert e, n-tile pid_n. Returns the ring step after the tile's last."""
    BLOCK_M: gl.constexpr = a_bufs.shape[1] // HALVES
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    RUNNING: gl.constexpr = 2 if SWIGLU else 1  # wgmma groups a K step starts: gate's, and up's
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_l))
    # rows past the expert's end read its last row's scales (in bounds); never stored
    as_ptrs = as_ptr + gl.minimum(rows, row_hi - 1).to(gl.int64) * stride_asm
    # BLOCK_N = 128: the tile's columns sit in one weight-scale block, one scale per K step
    bs_ptrs = bs_ptr + e.to(gl.int64) * stride_bse + pid_n * stride_bsn
    up_scales = n_tiles * stride_bsn  # SWIGLU: the up_proj rows' scale blocks, N rows further
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    # Two sets of partials, 0 and 1, take the even and the odd K blocks, and every block is promoted
    # while a later block's wgmma runs. No wgmma may still run where the loop jumps back (ptxas
    # serialises every wgmma of a kernel that carries a running one across a loop's back edge: "C7514,
    # non wgmma instructions reading accumulator registers"), so a trip ends with its odd block waited
    # for but not promoted: the next trip promotes it while its even block's wgmma runs. The first trip
    # promotes zeros; the tile's last block alone is promoted with no wgmma beside it.
    a_s, b_s, u_s = _scales(as_ptrs, bs_ptrs, up_scales, 0, SWIGLU)
    held = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)  # the previous trip's odd block, waited for
    held_up = held
    held_s = a_s * 0.0  # its scales (a row's times the weights'), zero before the first trip
    held_us = held_s
    for j in range(0, nk // 2):
        g0, u0 = _issue(c, a_bufs, b_bufs, u_bufs, ready, acc_l, RING, HALF, HALVES, STAGES, SWIGLU)
        acc, acc_up = _promote(acc, acc_up, held, held_up, held_s, held_us, SWIGLU)
        g1, u1 = _issue(c + 1, a_bufs, b_bufs, u_bufs, ready, acc_l, RING, HALF, HALVES, STAGES,
                        SWIGLU)
        d, d_up = _wait(g0, u0, RUNNING, SWIGLU)
        acc, acc_up = _promote(acc, acc_up, d, d_up, a_s * b_s, a_s * u_s, SWIGLU)
        a_s, b_s, u_s = _scales(as_ptrs, bs_ptrs, up_scales, 2 * j + 1, SWIGLU)
        held, held_up = _wait(g1, u1, 0, SWIGLU)
        _release(c, empty, RING, STAGES)  # both of the trip's slots at once: one meeting of the warps
        held_s, held_us = a_s * b_s, a_s * u_s
        a_s, b_s, u_s = _scales(as_ptrs, bs_ptrs, up_scales, gl.minimum(2 * j + 2, nk - 1), SWIGLU)
        c += 2
    acc, acc_up = _promote(acc, acc_up, held, held_up, held_s, held_us, SWIGLU)

    # epilogue: through shared memory into 16-byte row segments (the accumulator's registers hold two
    # neighbouring columns a thread, which would go out as 2-byte stores)
    if SWIGLU:  # SiLU(gate)·up, quantised per 128 channels: one group per row of the tile
        q, q_scale = quant_rows(acc / (1.0 + gl.exp(-acc)) * acc_up, FP8_MAX, EPS)
        _store_tile(c_ptr, stride_cm, q, m0, row_hi, pid_n * BLOCK_N)
        gl.store(cs_ptr + rows.to(gl.int64) * stride_csm + pid_n, q_scale, mask=rows < row_hi)
    else:
        _store_tile(c_ptr, stride_cm, acc.to(c_ptr.dtype.element_ty), m0, row_hi, pid_n * BLOCK_N)
    return c


@gluon.jit
def _gluon_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, N, K, N_W,
                  stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, E,
                  E_P2: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr, CONSUMERS: gl.constexpr,
                  HALVES: gl.constexpr, STAGES: gl.constexpr, SWIGLU: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  LOADER_REGS: gl.constexpr, FP8_MAX: gl.constexpr, EPS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    SLOTS: gl.constexpr = CONSUMERS * STAGES  # a ring of STAGES slots for each consumer
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [SLOTS, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [SLOTS, BLOCK_N, BLOCK_K], b_desc.layout)
    if SWIGLU:  # the up_proj rows of the same columns, N weight rows further
        u_bufs = gl.allocate_shared_memory(b_desc.dtype, [SLOTS, BLOCK_N, BLOCK_K], b_desc.layout)
    else:
        u_bufs = b_bufs
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())  # slot loaded
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())  # slot handed back
    for s in gl.static_range(SLOTS):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=HALVES)  # each half of a split tile hands a slot back
    # (partition arguments are tuples built inline: a tuple assigned to a name first loses its constexprs)
    if CONSUMERS * HALVES == 2:  # two consumer warpgroups, with their own tiles or halves of one: one's gaps
        # are the other's work
        gl.warp_specialize([
            (_consume, (a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, a_bufs, b_bufs, u_bufs, ready, empty,
                        N, K, N_W, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, E, E_P2, GROUP_M,
                        NUM_PROGS, CONSUMERS, HALVES, 0, STAGES, SWIGLU, FP8_MAX, EPS)),
            (_consume, (a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, a_bufs, b_bufs, u_bufs, ready, empty,
                        N, K, N_W, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, E, E_P2, GROUP_M,
                        NUM_PROGS, CONSUMERS, HALVES, 1, STAGES, SWIGLU, FP8_MAX, EPS)),
            (_load_warp, (a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, off_ptr, N, K, N_W, E, E_P2, GROUP_M,
                          NUM_PROGS, CONSUMERS, STAGES, SWIGLU)),
        ], [gl.num_warps(), 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consume, (a_desc, as_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, off_ptr, a_bufs, b_bufs, u_bufs, ready, empty,
                        N, K, N_W, stride_asm, stride_bse, stride_bsn, stride_cm, stride_csm, E, E_P2, GROUP_M,
                        NUM_PROGS, CONSUMERS, HALVES, 0, STAGES, SWIGLU, FP8_MAX, EPS)),
            (_load_warp, (a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty, off_ptr, N, K, N_W, E, E_P2, GROUP_M,
                          NUM_PROGS, CONSUMERS, STAGES, SWIGLU)),
        ], [1], [LOADER_REGS])
    for s in gl.static_range(SLOTS):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


# registers a thread of the producer warp keeps (setmaxnreg): its expert vectors (E/32 each) and loop state
LOADER_REGS = 56
# registers a thread of the second consumer warpgroup keeps (programs_per_sm = 2, split_m); the first
# gets what is left of the SM's 64K: 232 (the producer warp's warpgroup takes LOADER_REGS)
CONSUMER_REGS = 224


def launch_gluon(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c, c_scale, N_out: int,
                 cfg: GemmConfig, swiglu: bool, num_sms: int):
    """Run the Gluon kernel into c (and c_scale with the SwiGLU epilogue) on a Hopper GPU; returns the
    compiled kernel. The operands must pass `grouped_gemm_kernels.tma_ready`, and K `gluon_runs`."""
    (M, K), (E, N_w, _) = a_MK.shape, b_ENK.shape
    assert gluon_runs(K), f"the Gluon kernel takes K blocks two at a time: K={K}"
    assert gluon_takes(cfg, swiglu), f"the Gluon kernel's SwiGLU tiles split N over two warpgroups: {cfg.label}"
    num_m_bound = triton.cdiv(M, cfg.block_m) + min(E, M)
    # programs_per_sm = 2: two consumers (warpgroups with their own tiles and ring) in each program
    consumers = cfg.programs_per_sm
    progs = -(-min(num_sms * consumers, num_m_bound * (N_out // cfg.block_n)) // consumers)
    a_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_m, GROUP], gl.float8e4nv)
    b_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_n, GROUP], gl.float8e4nv)
    a_desc = TensorDescriptor(a_MK, [M, K], [a_MK.stride(0), 1], [cfg.block_m, GROUP], a_layout)
    b_desc = TensorDescriptor(b_ENK.view(E * N_w, K), [E * N_w, K], [b_ENK.stride(1), 1], [cfg.block_n, GROUP],
                              b_layout)
    return _gluon_kernel[(progs,)](
        a_desc, a_scale_MKb, b_desc, b_scale_ENbKb, c, c_scale, expert_offsets_E1, N_out, K, N_w,
        a_scale_MKb.stride(0), b_scale_ENbKb.stride(0), b_scale_ENbKb.stride(1), c.stride(0), c_scale.stride(0), E,
        E_P2=triton.next_power_of_2(E), GROUP_M=cfg.group_m, NUM_PROGS=progs, CONSUMERS=consumers,
        HALVES=halves(cfg), STAGES=cfg.num_stages, SWIGLU=swiglu, CONSUMER_REGS=CONSUMER_REGS,
        LOADER_REGS=LOADER_REGS, FP8_MAX=FP8_MAX, EPS=EPS, num_warps=cfg.num_warps // halves(cfg))


def halves(cfg: GemmConfig) -> int:
    """Consumer partitions sharing each tile (split_m: two of 4 warps, 64 rows each); the launch's num_warps
    is one partition's."""
    return 2 if cfg.split_m else 1
