"""The pieces of the Hopper Gluon kernel (grouped_gemm_gluon.py) below its structure: one K step's
wgmma into fresh partials, its wait, its promotion and scales, the hand-back of ring slots and the producer's
TMA loads, and the tile bookkeeping (which tile a consumer takes, the accumulator's and the store's layouts).
Dimensions as there: M = sorted rows, N = output features, K = reduction, E = experts.
"""

from moeplace.kernels._triton import HAS_GLUON, gl, gluon
from moeplace.kernels.grouped_gemm_kernels import _locate, _tile_coords

if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    # TMA's global-to-shared copy: `async_load` from Triton 3.7 on (3.9 refuses the old name), the same
    # arguments under 3.6's `async_copy_global_to_shared` (the device machine's Triton)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # all of the program's threads meet: `barrier` in 3.9, `thread_barrier` in 3.6
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.constexpr_function
def _acc_layout(BLOCK_M, BLOCK_N, num_warps):
    """wgmma's accumulator layout: warps take 16-row slices of M (a warpgroup's four warps 64 rows), and
    the warps M cannot use split N."""
    warps_m = min(num_warps, BLOCK_M // 16)
    warps_n = num_warps // warps_m
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_m, warps_n],
                                     instr_shape=[16, BLOCK_N // warps_n, 32])


@gluon.constexpr_function
def _store_layout(BLOCK_N, elem_bits, num_warps):
    """Rows of 16-byte segments: a thread stores 16 bytes of one row, a warp whole rows."""
    vec = 128 // elem_bits
    per_row = min(32, BLOCK_N // vec)
    return gl.BlockedLayout([1, vec], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.jit
def _store_tile(c_ptr, stride_cm, val, m0, row_hi, col0):
    """Store the tile `val` at rows m0.. (those before row_hi) and columns col0.. of c."""
    BLOCK_M: gl.constexpr = val.shape[0]
    BLOCK_N: gl.constexpr = val.shape[1]
    out_l: gl.constexpr = _store_layout(BLOCK_N, c_ptr.dtype.element_ty.primitive_bitwidth, gl.num_warps())
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_l))
    cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_l))
    gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :], gl.convert_layout(val, out_l),
             mask=(rows < row_hi)[:, None])


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _expert_tiles(off_ptr, E, E_P2: gl.constexpr, BLOCK_M: gl.constexpr, layout: gl.constexpr):
    """Per expert (vectors over E_P2): first row, end row, m-tiles, running end of the m-tiles."""
    e_idx = gl.arange(0, E_P2, layout=layout)
    lo = gl.load(off_ptr + e_idx, mask=e_idx < E, other=0)
    hi = gl.load(off_ptr + e_idx + 1, mask=e_idx < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    return e_idx, lo, hi, tiles, gl.associative_scan(tiles, 0, _add)


@gluon.jit
def _tile(cid, i, e_idx, lo, hi, tiles, tiles_end, num_m, n_tiles, STRIDE: gl.constexpr, GROUP_M: gl.constexpr,
          BLOCK_M: gl.constexpr):
    """Consumer cid's i-th tile (consumers take every STRIDE-th tile): (expert, first row, expert's end row,
    n-tile)."""
    tile_m, pid_n = _tile_coords(cid + i * STRIDE, num_m, n_tiles, GROUP_M)
    e, m0, row_hi = _locate(tile_m, e_idx, lo, hi, tiles, tiles_end, BLOCK_M)
    return e, m0, row_hi, pid_n


@gluon.jit
def _mine(total, cid, STRIDE: gl.constexpr):
    """How many of `total` tiles consumer cid takes."""
    return gl.maximum(total - cid + STRIDE - 1, 0) // STRIDE


@gluon.jit
def _ready(c, ready, RING: gl.constexpr, STAGES: gl.constexpr):
    """Wait until K step c's slot of the consumer's ring is loaded; returns the slot."""
    slot = RING * STAGES + c % STAGES
    mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
    return slot


@gluon.jit
def _issue(c, a_bufs, b_bufs, u_bufs, ready, acc_l: gl.constexpr, RING: gl.constexpr, HALF: gl.constexpr,
           HALVES: gl.constexpr, STAGES: gl.constexpr, SWIGLU: gl.constexpr):
    """Wait for K step c's operands and start its wgmma (gate's and up's under SwiGLU) into fresh partials
    (zeros made here: a zero tile kept alive through the loop would hold 64 registers a thread), on this
    consumer's HALF of the tile's rows."""
    BLOCK_M: gl.constexpr = a_bufs.shape[1] // HALVES
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    slot = _ready(c, ready, RING, STAGES)
    a = a_bufs.index(slot)
    if HALVES == 2:
        a = a.slice(HALF * BLOCK_M, BLOCK_M)
    part = warpgroup_mma(a, b_bufs.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    if SWIGLU:
        part_up = warpgroup_mma(a, u_bufs.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    else:
        part_up = part
    return part, part_up


@gluon.jit
def _wait(part, part_up, running: gl.constexpr, SWIGLU: gl.constexpr):
    """The partials of an earlier step, once at most `running` wgmma groups still run (the newer step's)."""
    if SWIGLU:
        done, done_up = warpgroup_mma_wait(num_outstanding=running, deps=(part, part_up))
    else:
        done = warpgroup_mma_wait(num_outstanding=running, deps=(part,))
        done_up = done
    return done, done_up


@gluon.jit
def _promote(acc, acc_up, done, done_up, scale, scale_up, SWIGLU: gl.constexpr):
    """Add one K block's partials with its scales (a row's activation scale times the weights'): one FMA
    an element."""
    acc += done * scale[:, None]
    if SWIGLU:
        acc_up += done_up * scale_up[:, None]
    return acc, acc_up


@gluon.jit
def _scales(as_ptrs, bs_ptrs, up_scales, kb, SWIGLU: gl.constexpr):
    """Scale block kb's scales: the tile's rows' (a vector), the weights' and the up_proj weights' (scalars);
    loaded a step before the promotion that reads them."""
    b_s = gl.load(bs_ptrs + kb)
    return gl.load(as_ptrs + kb), b_s, (gl.load(bs_ptrs + up_scales + kb) if SWIGLU else b_s)


@gluon.jit
def _release(c, empty, RING: gl.constexpr, STAGES: gl.constexpr):
    """Hand the slots of steps c and c + 1 back to the producer warp once no wgmma reads them: an arrive
    each, after the two warpgroups of an 8-warp consumer have met (each has waited for its own wgmma). A
    slot read by two 4-warp halves (split_m) is handed back once both have arrived."""
    if gl.num_warps() > 4:
        _cta_barrier()
    mbarrier.arrive(empty.index(RING * STAGES + c % STAGES))
    mbarrier.arrive(empty.index(RING * STAGES + (c + 1) % STAGES))


@gluon.jit
def _load_step(ring: gl.constexpr, p, live, m0, b_row, ks, N, a_desc, b_desc, a_bufs, b_bufs, u_bufs, ready, empty,
               STAGES: gl.constexpr, SWIGLU: gl.constexpr):
    """Load K step ks of a tile (its p-th step on this ring) once the ring's consumer handed the slot back."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    slot = ring * STAGES + p % STAGES
    # a fresh barrier counts as having completed the phase before its first: round 0 passes
    mbarrier.wait(empty.index(slot), ((p // STAGES) & 1) ^ 1, pred=live)
    bar = ready.index(slot)
    if SWIGLU:
        mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes, pred=live)
        _tma_load(b_desc, [b_row + N, ks * BLOCK_K], bar, u_bufs.index(slot), live)
    else:
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=live)
    _tma_load(a_desc, [m0, ks * BLOCK_K], bar, a_bufs.index(slot), live)
    _tma_load(b_desc, [b_row, ks * BLOCK_K], bar, b_bufs.index(slot), live)
