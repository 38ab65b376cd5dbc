"""Expert compute of one rank's slots, and the bytes each dispatched row carries to it.

Legend: T tokens of the source rank, U rows a rank sends or receives (one per (token, destination
rank)), M (row, local slot) assignments a rank computes, S slots of the rank, D hidden,
F expert intermediate; lower-case d: 128-blocks along D.

Two paths, one per `ExpertPath`:
- reference: rows travel in the activations' dtype; each slot's weights are dequantised and
  multiplied in that dtype (the CPU path, and the exact check against the single-process reference).
- fp8: each token is quantised once on its source rank (per 128 channels, DeepSeek-V3's activation
  scheme) and travels as FP8 bytes + float32 scales, half the bytes of bf16; the receiving rank runs
  moeplace.kernels' grouped block-scaled GEMMs, gate/up with SiLU·up and FP8 requantisation fused,
  then down. Quantising before the wire equals quantising after it: the grouping is per row.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from moeplace.kernels.fp8 import FP8, GROUP, dequant_weight_blocks_ref



class ExpertPath(str, enum.Enum):
    reference = "reference"
    fp8 = "fp8"

    @classmethod
    def default(cls, device: torch.device, hidden: int, intermediate: int, block: tuple[int, int]) -> ExpertPath:
        """fp8 on CUDA where the kernels fit the shapes (D and F multiples of 128, 128x128 weight blocks)."""
        if device.type != "cuda":
            return cls.reference
        from moeplace.kernels._triton import HAS_TRITON

        fits = hidden % GROUP == 0 and intermediate % GROUP == 0 and tuple(block) == (GROUP, GROUP)
        return cls.fp8 if HAS_TRITON and fits else cls.reference


def feature_bytes(path: ExpertPath, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one token's activations on the wire."""
    if path is ExpertPath.fp8:
        return hidden + 4 * (hidden // GROUP)  # FP8 values, then one float32 scale per 128 channels
    return hidden * torch.empty((), dtype=dtype).element_size()


def encode_tokens(x_TD: torch.Tensor, path: ExpertPath, row_bytes: int) -> torch.Tensor:
    """[T, row_bytes] uint8: each token's wire features first; the rest of the row is left for the caller."""
    T, D = x_TD.shape
    rows_TW = torch.empty(T, row_bytes, dtype=torch.uint8, device=x_TD.device)
    width = feature_bytes(path, D, x_TD.dtype)
    if path is ExpertPath.reference:
        rows_TW[:, :width] = x_TD.contiguous().view(torch.uint8)
    elif T:
        from moeplace.kernels.fp8_quant import per_token_group_quant_fp8

        q_TD, scale_Td = per_token_group_quant_fp8(x_TD.contiguous())
        rows_TW[:, :D] = q_TD.view(torch.uint8)
        rows_TW[:, D:width] = scale_Td.view(torch.uint8)
    return rows_TW


def decode_features(rows_MW: torch.Tensor, path: ExpertPath, hidden: int, dtype: torch.dtype):
    """Views into received rows: reference -> x_MD `dtype`; fp8 -> (a_MD float8_e4m3fn, a_scale_Md float32).

    The views are strided (one row = row_bytes); the kernels take any row stride."""
    if path is ExpertPath.reference:
        return rows_MW[:, : feature_bytes(path, hidden, dtype)].view(dtype)
    scales = rows_MW[:, hidden: feature_bytes(path, hidden, dtype)]
    return rows_MW[:, :hidden].view(FP8), scales.view(torch.float32)


def reference_experts(x_MD: torch.Tensor, counts_S: list[int], w13_SFD, w13_sinv_Sfd, w2_SDF, w2_sinv_Sdf,
                      block: tuple[int, int]) -> torch.Tensor:
    """Rows grouped by slot (counts_S[s] rows of slot s, in slot order) through their experts: [M, D] x's dtype."""
    out_MD = torch.empty(x_MD.shape, dtype=x_MD.dtype, device=x_MD.device)
    start = 0
    for s, n in enumerate(counts_S):
        if n:
            # A fresh tensor per slot, as the matmuls have always seen it (bit-for-bit stable CPU results).
            out_MD[start: start + n] = _expert(x_MD[start: start + n].clone(), w13_SFD[s], w13_sinv_Sfd[s],
                                               w2_SDF[s], w2_sinv_Sdf[s], block)
            start += n
    return out_MD


def _expert(x_ND, w13_FD, w13_sinv_fd, w2_DF, w2_sinv_df, block) -> torch.Tensor:
    Fi, f = w2_DF.shape[1], w13_sinv_fd.shape[0] // 2
    # gate and up are dequantised apart: each has its own block grid when F is not a block multiple.
    gate_FD = dequant_weight_blocks_ref(w13_FD[:Fi], w13_sinv_fd[:f], block, x_ND.dtype)
    up_FD = dequant_weight_blocks_ref(w13_FD[Fi:], w13_sinv_fd[f:], block, x_ND.dtype)
    down_DF = dequant_weight_blocks_ref(w2_DF, w2_sinv_df, block, x_ND.dtype)
    return (F.silu(x_ND @ gate_FD.T) * (x_ND @ up_FD.T)) @ down_DF.T


def fp8_experts(a_MD: torch.Tensor, a_scale_Md: torch.Tensor, offsets_S1: torch.Tensor, w13_SFD, w13_sinv_Sfd,
                w2_SDF, w2_sinv_Sdf, out_dtype: torch.dtype,
                offsets_host: list[int] | None = None) -> torch.Tensor:
    """FP8 rows grouped by slot (slot s owns rows [offsets_S1[s], offsets_S1[s+1]), int32 on device) through
    gate/up + SiLU·up + requantise, then down: [M, D] out_dtype. No host sync: `offsets_host` (the same
    offsets as host ints, where the caller has them) lets the kernels' dispatch use the torch loop too."""
    from moeplace.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_swiglu_fp8

    g_MF, g_scale_Mf = grouped_gemm_swiglu_fp8(a_MD, a_scale_Md, w13_SFD, w13_sinv_Sfd, offsets_S1, None,
                                               offsets_host)
    return grouped_gemm_fp8(g_MF, g_scale_Mf, w2_SDF, w2_sinv_Sdf, offsets_S1, out_dtype, None, offsets_host)
