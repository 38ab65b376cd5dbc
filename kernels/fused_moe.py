"""DeepSeek-V3 routed experts on FP8 weights: permute+quantise → gate/up GEMM with SiLU(gate)·up and
FP8 requantisation in its epilogue → down GEMM → weighted combine: five Triton launches (one for the
routing plan). No host sync, so a CUDA graph can capture it, unless the measured GEMM table picks the
torch per-expert loop for a prefill shape (never while capturing: grouped_gemm.choose_config) and the
caller passes no host copy of the expert offsets.

Weights as in the checkpoint, 128×128 block scales: w13_E2FD [E, 2F, D] float8_e4m3fn (rows [0, F) are
gate_proj, [F, 2F) up_proj) with w13_scale [E, 2F/128, D/128]; w2_EDF [E, D, F] (down_proj) with
w2_scale [E, D/128, F/128]. Dimensions: T = tokens, K = top-k, E = experts, D = hidden, F = expert
intermediate size, M = T*K sorted rows.
"""

from collections.abc import Callable, Sequence

import torch

from moeplace.kernels._triton import require_triton
from moeplace.kernels.fp8_quant import FP8, GROUP, check_activations, dequant_rows_ref, dequant_weight_blocks_ref, \
    per_token_group_quant_fp8_ref
from moeplace.kernels.grouped_gemm import GemmConfig, grouped_gemm_fp8, grouped_gemm_swiglu_fp8, swiglu_quant_ref
from moeplace.kernels.permute import check_topk_ids, moe_routing_plan, permute_quant, unpermute_combine


def check_moe_operands(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale) -> None:
    check_activations(x_TD)
    check_topk_ids(topk_ids_TK)
    T, D = x_TD.shape
    assert topk_ids_TK.shape[0] == T, f"topk_ids_TK has {topk_ids_TK.shape[0]} tokens, x_TD has {T}"
    assert topk_weights_TK.shape == topk_ids_TK.shape, \
        f"topk_weights_TK {tuple(topk_weights_TK.shape)} != topk_ids_TK {tuple(topk_ids_TK.shape)}"
    assert w13_E2FD.dim() == 3 and w2_EDF.dim() == 3, f"w13 {tuple(w13_E2FD.shape)} and w2 {tuple(w2_EDF.shape)} must be 3-D"
    E, F2, D13 = w13_E2FD.shape
    assert D13 == D and w2_EDF.shape == (E, D, F2 // 2), \
        f"w13 [E, 2F, D] = {tuple(w13_E2FD.shape)} and w2 [E, D, F] = {tuple(w2_EDF.shape)} do not fit D={D}"
    for name, w, s in (("w13", w13_E2FD, w13_scale), ("w2", w2_EDF, w2_scale)):
        assert w.dtype == FP8, f"{name}: float8_e4m3fn expected, got {w.dtype}"
        want = (E, w.shape[1] // GROUP, w.shape[2] // GROUP)
        assert s.shape == want and s.dtype == torch.float32, f"{name}_scale must be {want} float32, got {tuple(s.shape)} {s.dtype}"


def fused_moe(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
              w13_E2FD: torch.Tensor, w13_scale: torch.Tensor, w2_EDF: torch.Tensor, w2_scale: torch.Tensor,
              configs: tuple[GemmConfig, GemmConfig] | None = None,
              expert_offsets_host: Sequence[int] | None = None,
              on_stage: Callable[[str], None] | None = None) -> torch.Tensor:
    """x_TD [T, D] bf16, topk_ids_TK [T, K] int (-1 = not routed here), topk_weights_TK [T, K] float →
    out_TD [T, D] x's dtype: Σ_k w[t, k] · expert_{ids[t, k]}(x[t]); `configs` = (gate/up, down) tiles.
    `expert_offsets_host`: [E + 1] running sums of the rows routed to each expert, as host ints, where
    the caller knows them (it must: they are not checked against the ids); they spare the torch loop
    backend its host sync (grouped_gemm_fp8). `on_stage(name)` is called as each stage's kernels are issued
    (plan, permute, gate/up+SwiGLU, down, combine: the benchmark times the stages by it)."""
    require_triton()
    check_moe_operands(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale)
    up_cfg, down_cfg = configs or (None, None)
    mark = on_stage or (lambda name: None)
    plan = moe_routing_plan(topk_ids_TK, w13_E2FD.shape[0])
    mark("plan")
    a_MD, a_scale = permute_quant(x_TD, plan)
    mark("permute")
    off, host = plan.expert_offsets_E1, expert_offsets_host
    g_MF, g_scale = grouped_gemm_swiglu_fp8(a_MD, a_scale, w13_E2FD, w13_scale, off, up_cfg, host)
    mark("gate/up+SwiGLU")
    y_MD = grouped_gemm_fp8(g_MF, g_scale, w2_EDF, w2_scale, off, x_TD.dtype, down_cfg, host)
    mark("down")
    out_TD = unpermute_combine(y_MD, plan, topk_weights_TK)
    mark("combine")
    return out_TD


def fused_moe_ref(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  w13_E2FD: torch.Tensor, w13_scale: torch.Tensor, w2_EDF: torch.Tensor, w2_scale: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference, expert by expert in float64, with the kernels' two FP8 activation roundings
    (the input, and SiLU(gate)·up, each per 128 channels): [T, D] float64."""
    check_moe_operands(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale)
    x = dequant_rows_ref(*per_token_group_quant_fp8_ref(x_TD))
    out = torch.zeros_like(x)
    for e in topk_ids_TK[topk_ids_TK >= 0].unique().tolist():
        t_idx, k_idx = torch.nonzero(topk_ids_TK == e, as_tuple=True)
        h = x[t_idx] @ dequant_weight_blocks_ref(w13_E2FD[e], w13_scale[e]).T
        y = dequant_rows_ref(*swiglu_quant_ref(h)) @ dequant_weight_blocks_ref(w2_EDF[e], w2_scale[e]).T
        out.index_add_(0, t_idx, topk_weights_TK[t_idx, k_idx].double()[:, None] * y)
    return out
