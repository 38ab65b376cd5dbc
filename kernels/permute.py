"""Token permutation for grouped expert GEMMs.

The (token, k) rows of a routing decision are sorted by expert into one contiguous layout: expert e owns
rows [expert_offsets_E1[e], expert_offsets_E1[e + 1]), and within an expert rows keep token order (a
stable sort). Permuting quantises the activations to FP8 on the way (each token once, stored K times);
unpermuting sums each token's K expert outputs with its routing weights.
Dimensions: T = tokens, K = top-k, E = experts, D = hidden, M = T*K sorted rows (an upper bound: rows
from expert_offsets_E1[E] on belong to no expert, which is where -1 ids would have gone).
"""

from dataclasses import dataclass

import torch

from moeplace.kernels._triton import require_triton, tl, triton
from moeplace.kernels.fp8_quant import EPS, FP8, FP8_MAX, GROUP, check_activations, per_token_group_quant_fp8_ref, quant_rows


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """Where each routed (token, k) row sits once rows are sorted by expert; lives on the ids' device."""

    expert_offsets_E1: torch.Tensor  # [E + 1] int32, offsets[0] = 0, offsets[E] = rows with a valid id
    row_pos_TK: torch.Tensor  # [T, K] int32 sorted row of (token, k); -1 where the id was -1

    def __post_init__(self):
        assert self.expert_offsets_E1.dim() == 1 and self.expert_offsets_E1.dtype == torch.int32, \
            f"expert_offsets_E1 must be [E + 1] int32, got {tuple(self.expert_offsets_E1.shape)} {self.expert_offsets_E1.dtype}"
        assert self.row_pos_TK.dim() == 2 and self.row_pos_TK.dtype == torch.int32 and self.row_pos_TK.is_contiguous(), \
            f"row_pos_TK must be contiguous [T, K] int32, got {tuple(self.row_pos_TK.shape)} {self.row_pos_TK.dtype}"

    @property
    def num_rows(self) -> int:  # M, the rows every sorted buffer has
        return self.row_pos_TK.numel()


def check_topk_ids(topk_ids_TK: torch.Tensor) -> None:
    assert topk_ids_TK.dim() == 2, f"topk_ids_TK must be [T, K], got shape {tuple(topk_ids_TK.shape)}"
    assert topk_ids_TK.dtype in (torch.int32, torch.int64), f"topk_ids_TK: integer ids expected, got {topk_ids_TK.dtype}"
    assert topk_ids_TK.is_contiguous(), f"topk_ids_TK must be contiguous, strides {topk_ids_TK.stride()}"


# ---------------------------------------------------------------- routing plan


@triton.jit
def _block_hits(ids_ptr, start, n, E, experts, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK): (valid [BLOCK], one-hot expert [BLOCK, E_P2] int32); ids outside
    [0, E), -1 included, hit no expert."""
    offs = start + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    valid = (ids >= 0) & (ids < E)
    return valid, (tl.where(valid, ids, -1)[:, None] == experts[None, :]).to(tl.int32)


@triton.jit
def _place_block(ids_ptr, row_pos_ptr, start, n, E, experts, next_free, BLOCK: tl.constexpr):
    """A row's slot = its expert's next free slot + its rank among this block's rows of that expert (an
    inclusive scan down the block keeps the sort stable); returns the next free slots after the block."""
    valid, hit = _block_hits(ids_ptr, start, n, E, experts, BLOCK)
    pos = tl.sum(hit * (next_free[None, :] + tl.cumsum(hit, axis=0) - 1), axis=1)
    offs = start + tl.arange(0, BLOCK)
    tl.store(row_pos_ptr + offs, tl.where(valid, pos, -1), mask=offs < n)
    return next_free + tl.sum(hit, axis=0)


@triton.jit
def _store_offsets(offsets_ptr, counts, experts, E):
    ends = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + experts + 1, ends, mask=experts < E)
    tl.store(offsets_ptr, 0)
    return ends - counts


@triton.jit
def _plan_one_program_kernel(ids_ptr, offsets_ptr, row_pos_ptr, n, E, E_P2: tl.constexpr, BLOCK: tl.constexpr):
    # decode: one program walks the few thousand ids twice, one launch in all
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        counts += tl.sum(_block_hits(ids_ptr, start, n, E, experts, BLOCK)[1], axis=0)
    next_free = _store_offsets(offsets_ptr, counts, experts, E)
    for start in range(0, n, BLOCK):
        next_free = _place_block(ids_ptr, row_pos_ptr, start, n, E, experts, next_free, BLOCK)


@triton.jit
def _block_count_kernel(ids_ptr, block_counts_ptr, n, E, E_P2: tl.constexpr, BLOCK: tl.constexpr):
    experts = tl.arange(0, E_P2)
    hits = _block_hits(ids_ptr, tl.program_id(0) * BLOCK, n, E, experts, BLOCK)[1]
    tl.store(block_counts_ptr + tl.program_id(0) * E_P2 + experts, tl.sum(hits, axis=0))


@triton.jit
def _block_place_kernel(ids_ptr, block_counts_ptr, offsets_ptr, row_pos_ptr, n, E, NB,
                        E_P2: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # prefill: every block's program sums all blocks' counts (and the earlier ones) itself: no scan launch
    b = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    total = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for j in range(0, NB, CHUNK):
        blocks = j + tl.arange(0, CHUNK)
        c = tl.load(block_counts_ptr + blocks[:, None] * E_P2 + experts[None, :], mask=(blocks < NB)[:, None], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((blocks < b)[:, None], c, 0), axis=0)
    ends = tl.cumsum(total, axis=0)
    if b == 0:
        _store_offsets(offsets_ptr, total, experts, E)
    _place_block(ids_ptr, row_pos_ptr, b * BLOCK, n, E, experts, ends - total + before, BLOCK)


ONE_PROGRAM_MAX_ROWS = 8192  # up to here one program is fastest (decode); past it, one program per block


def moe_routing_plan(topk_ids_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """topk_ids_TK: [T, K] int32/int64, -1 = no selection → RoutingPlan (stable sort by expert), no host
    sync (CUDA-graph capturable): one launch up to ONE_PROGRAM_MAX_ROWS ids, two past it."""
    require_triton()
    check_topk_ids(topk_ids_TK)
    assert num_experts > 0, f"num_experts must be positive, got {num_experts}"
    n, E, dev = topk_ids_TK.numel(), num_experts, topk_ids_TK.device
    E_P2 = triton.next_power_of_2(E)
    expert_offsets_E1 = torch.empty(E + 1, dtype=torch.int32, device=dev)
    row_pos_TK = torch.empty(topk_ids_TK.shape, dtype=torch.int32, device=dev)
    if n <= ONE_PROGRAM_MAX_ROWS:
        BLOCK = max(16, min(1024, 16384 // E_P2))  # a [BLOCK, E_P2] one-hot of 16K elements per step
        _plan_one_program_kernel[(1,)](topk_ids_TK, expert_offsets_E1, row_pos_TK, n, E, E_P2=E_P2, BLOCK=BLOCK,
                                       num_warps=8)
    else:
        # each program re-reads all NB × E_P2 block counts (from L2): blocks of 32K one-hot elements keep
        # that small (E 256: 256 programs × 256 KB), and each block's scan cheap
        BLOCK = max(16, min(256, 32768 // E_P2))
        NB = triton.cdiv(n, BLOCK)
        block_counts = torch.empty(NB, E_P2, dtype=torch.int32, device=dev)
        _block_count_kernel[(NB,)](topk_ids_TK, block_counts, n, E, E_P2=E_P2, BLOCK=BLOCK)
        _block_place_kernel[(NB,)](topk_ids_TK, block_counts, expert_offsets_E1, row_pos_TK, n, E, NB, E_P2=E_P2,
                                   BLOCK=BLOCK, CHUNK=max(1, 4096 // E_P2), num_warps=8)
    return RoutingPlan(expert_offsets_E1, row_pos_TK)


def moe_routing_plan_ref(topk_ids_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Plain-torch reference: a stable argsort of the flattened ids, invalid ids sorted last."""
    check_topk_ids(topk_ids_TK)
    ids = topk_ids_TK.flatten().long()
    valid = (ids >= 0) & (ids < num_experts)
    order = torch.argsort(torch.where(valid, ids, num_experts), stable=True)
    pos = torch.empty_like(ids)
    pos[order] = torch.arange(ids.numel(), device=ids.device)
    pos[~valid] = -1
    counts = torch.bincount(ids[valid], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return RoutingPlan(offsets, pos.to(torch.int32).view(topk_ids_TK.shape))


# ---------------------------------------------------------------- permute with FP8 quantisation


@triton.jit
def _permute_quant_kernel(x_ptr, row_pos_ptr, q_ptr, s_ptr, NG, stride_xt, stride_qm, stride_sm,
                          K: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
                          FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    # program (t, j): token t, channel groups [j*GROUPS, (j+1)*GROUPS); quantised once, stored K times
    t = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    gmask = g < NG
    x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + cols, mask=gmask[:, None], other=0.0).to(tl.float32)
    q, s = quant_rows(x, FP8_MAX, EPS)
    for k in tl.static_range(K):
        pos = tl.load(row_pos_ptr + t * K + k).to(tl.int64)
        keep = g < tl.where(pos >= 0, NG, 0)  # not `gmask & (pos >= 0)`: the interpreter rejects that mask
        tl.store(q_ptr + pos * stride_qm + cols, q, mask=keep[:, None])
        tl.store(s_ptr + pos * stride_sm + g, s, mask=keep)


def _check_plan(plan: RoutingPlan, T: int, device: torch.device) -> None:
    assert plan.row_pos_TK.shape[0] == T, f"plan has {plan.row_pos_TK.shape[0]} tokens, activations have {T}"
    assert plan.row_pos_TK.device == device, f"plan on {plan.row_pos_TK.device}, activations on {device}"


def permute_quant(x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """x_TD: [T, D] bf16/fp16/fp32 → (a_MD [M, D] float8_e4m3fn, a_scale_MG [M, D // 128] float32) in the
    sorted layout, M = T*K. Rows from expert_offsets_E1[E] on are left unwritten."""
    require_triton()
    check_activations(x_TD)
    T, D = x_TD.shape
    _check_plan(plan, T, x_TD.device)
    M, K, NG = plan.num_rows, plan.row_pos_TK.shape[1], D // GROUP
    a_MD = torch.empty(M, D, dtype=FP8, device=x_TD.device)
    a_scale_MG = torch.empty(M, NG, dtype=torch.float32, device=x_TD.device)
    GROUPS = 8  # 1024 channels a program: enough bytes in flight, and 7168 / 1024 programs per token
    grid = (T, triton.cdiv(NG, GROUPS))
    if T > 0:
        _permute_quant_kernel[grid](x_TD, plan.row_pos_TK, a_MD, a_scale_MG, NG, x_TD.stride(0), a_MD.stride(0),
                                    a_scale_MG.stride(0), K=K, GROUPS=GROUPS, GROUP=GROUP, FP8_MAX=FP8_MAX, EPS=EPS)
    return a_MD, a_scale_MG


def permute_quant_ref(x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `permute_quant`; rows that no (token, k) maps to are zero."""
    q_TD, s_TG = per_token_group_quant_fp8_ref(x_TD)
    T, K = plan.row_pos_TK.shape
    pos = plan.row_pos_TK.flatten().long()
    src = torch.arange(T, device=x_TD.device).repeat_interleave(K)[pos >= 0]
    a = torch.zeros(plan.num_rows, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
    s = torch.zeros(plan.num_rows, s_TG.shape[1], dtype=torch.float32, device=x_TD.device)
    a[pos[pos >= 0]] = q_TD[src].float()
    s[pos[pos >= 0]] = s_TG[src]
    return a.to(FP8), s


# ---------------------------------------------------------------- unpermute with weighted combine


@triton.jit
def _unpermute_kernel(y_ptr, row_pos_ptr, w_ptr, out_ptr, D, stride_ym, stride_ot,
                      K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):  # fixed k order: the sum is deterministic, unlike atomics
        pos = tl.load(row_pos_ptr + t * K + k).to(tl.int64)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        y = tl.load(y_ptr + pos * stride_ym + cols, mask=cols < tl.where(pos >= 0, D, 0), other=0.0).to(tl.float32)
        acc += tl.where(pos >= 0, w, 0.0) * y
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def _check_combine(y_MD: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor) -> None:
    assert y_MD.dim() == 2 and y_MD.shape[0] == plan.num_rows, \
        f"y_MD must be [M={plan.num_rows}, D], got {tuple(y_MD.shape)}"
    assert y_MD.stride(1) == 1, f"y_MD: channels must be contiguous, strides {y_MD.stride()}"
    assert topk_weights_TK.shape == plan.row_pos_TK.shape, \
        f"topk_weights_TK {tuple(topk_weights_TK.shape)} != row_pos_TK {tuple(plan.row_pos_TK.shape)}"
    assert topk_weights_TK.is_contiguous() and topk_weights_TK.is_floating_point(), \
        f"topk_weights_TK must be contiguous floats, got {topk_weights_TK.dtype} strides {topk_weights_TK.stride()}"
    assert y_MD.device == plan.row_pos_TK.device == topk_weights_TK.device, "y_MD, plan and weights on different devices"


def unpermute_combine(y_MD: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """y_MD: [M, D] expert outputs in the sorted layout, topk_weights_TK: [T, K] → out_TD [T, D], y's dtype:
    out[t] = Σ_k w[t, k] · y[row_pos[t, k]] over k with a valid id (a token with none gets zeros)."""
    require_triton()
    _check_combine(y_MD, plan, topk_weights_TK)
    (T, K), D = plan.row_pos_TK.shape, y_MD.shape[1]
    out_TD = torch.empty(T, D, dtype=y_MD.dtype, device=y_MD.device)
    BLOCK_D = 1024
    if T > 0:
        _unpermute_kernel[(T, triton.cdiv(D, BLOCK_D))](y_MD, plan.row_pos_TK, topk_weights_TK, out_TD, D,
                                                         y_MD.stride(0), out_TD.stride(0), K=K, BLOCK_D=BLOCK_D)
    return out_TD


def unpermute_combine_ref(y_MD: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference in float64: [T, D]."""
    _check_combine(y_MD, plan, topk_weights_TK)
    pos = plan.row_pos_TK.long()
    y = torch.where((pos >= 0)[..., None], y_MD.double()[pos.clamp_min(0)], 0.0)  # [T, K, D]
    w = torch.where(pos >= 0, topk_weights_TK.double(), 0.0)
    return (w[..., None] * y).sum(dim=1)
