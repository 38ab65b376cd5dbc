"""FP8 block-scaled grouped GEMM over rows grouped by expert (DeepSeek-V3 expert weights), and the
dispatch that picks its implementation.

Rows of `a` are sorted by expert (see permute.py): expert e owns rows [off[e], off[e+1]). Each expert's
rows multiply that expert's weight, c[rows_e] = a[rows_e] @ b[e].T, with DeepSeek's block scales (1×128
on the activations, 128×128 on the weights). Three implementations (gemm_table.Backend): two Triton
kernels (grouped_gemm_kernels.py) and torch's cuBLAS `_scaled_mm` per expert (torch_gemm.py). Which one
and which tile is a measured choice per (rows per expert, N, K) bucket (gemm_table.py); a CUDA graph
capture never gets the torch loop, which reads the expert counts on the host.
Dimensions: M = sorted rows, N = output features, K = reduction, E = experts, Kb = K // 128, Nb = N // 128.
"""

from collections.abc import Sequence

import torch

from moeplace.kernels._triton import require_triton
from moeplace.kernels.fp8_quant import FP8, GROUP, dequant_rows_ref, dequant_weight_blocks_ref, \
    per_token_group_quant_fp8_ref
from moeplace.kernels.gemm_table import Backend, GemmConfig, GemmKind, default_config, fuses_swiglu, lookup
from moeplace.kernels.grouped_gemm_kernels import launch
from moeplace.kernels.torch_gemm import grouped_gemm_torch, swiglu_quant

__all__ = ["GemmConfig", "choose_config", "grouped_gemm_fp8", "grouped_gemm_swiglu_fp8", "grouped_gemm_ref"]


def choose_config(kind: GemmKind, M: int, E: int, N: int, K: int, device: torch.device,
                  torch_loop_ok: bool = True, host_offsets: bool = False) -> GemmConfig:
    """The measured table's choice for this shape on this card, else `default_config`. No host sync: the
    rows per expert are M / E from the shapes. `host_offsets`: the caller holds the expert offsets on the
    host (the table's winner for that case: the torch loop then pays no sync). The table's best Triton
    config instead of the torch loop while a CUDA graph is captured (the loop reads counts on the host)
    or where `torch_loop_ok` is False (the sweep measured the loop with bf16 output only)."""
    if device.type != "cuda":
        return default_config(M / max(E, 1))
    entry = lookup(kind, M / max(E, 1), N, K, torch.cuda.get_device_name(device))
    if entry is None:
        return default_config(M / max(E, 1))
    best = entry.best_host if host_offsets else entry.best
    capturing = torch.cuda.is_current_stream_capturing()
    if best.backend is Backend.torch_loop and (capturing or not torch_loop_ok):
        return entry.best_triton
    return best


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


def grouped_gemm_fp8(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, b_ENK: torch.Tensor, b_scale_ENbKb: torch.Tensor,
                     expert_offsets_E1: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                     config: GemmConfig | None = None,
                     expert_offsets_host: Sequence[int] | None = None) -> torch.Tensor:
    """a_MK [M, K] fp8 with a_scale_MKb [M, K/128] f32 (rows sorted by expert), b_ENK [E, N, K] fp8 with
    b_scale_ENbKb [E, N/128, K/128] f32, expert_offsets_E1 [E + 1] int32 → c_MN [M, N] out_dtype.
    Rows from expert_offsets_E1[E] on are left unwritten by the Triton kernels (the torch loop may write
    them). `config` None: the measured choice (`choose_config`). `expert_offsets_host`: the same E + 1
    offsets as host ints where the caller already has them (no sync for the torch loop; the Triton
    kernels read the device copy); never inside a CUDA graph capture, whose replays see new offsets."""
    require_triton()
    check_grouped_operands(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1)
    (M, K), (E, N, _) = a_MK.shape, b_ENK.shape
    assert out_dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported out_dtype {out_dtype}"
    host = expert_offsets_host is not None
    cfg = config or choose_config(GemmKind.plain, M, E, N, K, a_MK.device, out_dtype == torch.bfloat16, host)
    if cfg.backend is Backend.torch_loop:
        return grouped_gemm_torch(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, out_dtype,
                                  expert_offsets_host, cfg.streams)
    c_MN = torch.empty(M, N, dtype=out_dtype, device=a_MK.device)
    launch(a_MK, a_scale_MKb, b_ENK, b_scale_ENbKb, expert_offsets_E1, c_MN, c_MN, N, cfg, swiglu=False)
    return c_MN


def grouped_gemm_swiglu_fp8(a_MK: torch.Tensor, a_scale_MKb: torch.Tensor, w13_E2FK: torch.Tensor,
                            w13_scale: torch.Tensor, expert_offsets_E1: torch.Tensor,
                            config: GemmConfig | None = None, expert_offsets_host: Sequence[int] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate/up GEMM with SiLU(gate)·up and FP8 requantisation fused into the epilogue (no bf16 round trip):
    w13_E2FK [E, 2F, K] fp8 (rows [0, F) gate, [F, 2F) up) with w13_scale [E, 2F/128, K/128] →
    (g_MF [M, F] float8_e4m3fn, g_scale_MFb [M, F/128] float32), rows past the last expert unwritten.
    A config that does not fuse it (`fuses_swiglu`: the torch loop, the gluon tiles without room for gate
    and up) instead writes gate|up in bf16 and applies SiLU·up + quantisation after.
    `expert_offsets_host` as in `grouped_gemm_fp8`."""
    require_triton()
    check_grouped_operands(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1)
    (M, K), (E, F2, _) = a_MK.shape, w13_E2FK.shape
    assert F2 % (2 * GROUP) == 0, f"w13_E2FK: 2F={F2} must be a multiple of {2 * GROUP}"
    host = expert_offsets_host is not None
    cfg = config or choose_config(GemmKind.swiglu, M, E, F2, K, a_MK.device, host_offsets=host)
    if not fuses_swiglu(cfg):
        return swiglu_quant(grouped_gemm_fp8(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1,
                                             torch.bfloat16, cfg, expert_offsets_host), expert_offsets_E1[E:])
    assert cfg.block_n == GROUP, f"the fused epilogue quantises one {GROUP}-channel group per tile: block_n={cfg.block_n}"
    g_MF = torch.empty(M, F2 // 2, dtype=FP8, device=a_MK.device)
    g_scale_MFb = torch.empty(M, F2 // 2 // GROUP, dtype=torch.float32, device=a_MK.device)
    launch(a_MK, a_scale_MKb, w13_E2FK, w13_scale, expert_offsets_E1, g_MF, g_scale_MFb, F2 // 2, cfg, swiglu=True)
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
