"""FP8 (e4m3) block scaling in plain torch: the one convention of moeplace, shared by the runtime
(checkpoints, CPU expert path) and the Triton kernels (fp8_quant.py and the GEMMs check against these).

Activations: each row is cut into groups of 128 channels with one scale each. Weights: one scale per
128x128 block, the layout of DeepSeek-V3's `weight_scale_inv`. A scale is max(amax, EPS) / 448, so the
largest value maps to the largest finite e4m3 value and `x ≈ q * scale`; an all-zero group or block
gets the finite scale EPS / 448 and quantises to zeros. Imports no Triton.
Dimensions: T = tokens (rows), D = channels, G = D // 128 groups; N x K weights, n x k scale blocks.
"""

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
GROUP = 128  # channels per activation scale, and the side of a weight scale block
EPS = 1e-10  # floor on amax, so that an all-zero group gets a finite scale and quantises to zeros


def check_activations(x_TD: torch.Tensor, name: str = "x_TD") -> None:
    """Preconditions shared by the wrappers that quantise activations."""
    assert x_TD.dim() == 2, f"{name} must be [T, D], got shape {tuple(x_TD.shape)}"
    assert x_TD.dtype in (torch.bfloat16, torch.float16, torch.float32), f"{name}: unsupported dtype {x_TD.dtype}"
    assert x_TD.shape[1] % GROUP == 0, f"{name}: D={x_TD.shape[1]} is not a multiple of {GROUP}"
    assert x_TD.stride(1) == 1, f"{name}: channels must be contiguous, strides {x_TD.stride()}"


def per_token_group_quant_fp8_ref(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `per_token_group_quant_fp8`; float32 arithmetic like the kernel."""
    check_activations(x_TD)
    T, D = x_TD.shape
    x = x_TD.float().view(T, D // GROUP, GROUP)
    scale_TG = x.abs().amax(dim=-1).clamp_min(EPS) / FP8_MAX
    q = (x / scale_TG[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(T, D), scale_TG


def dequant_rows_ref(q_TD: torch.Tensor, scale_TG: torch.Tensor) -> torch.Tensor:
    """Per-token-group FP8 → float64: [T, D] with scales [T, D // 128]."""
    T, D = q_TD.shape
    assert scale_TG.shape == (T, D // GROUP), f"scale shape {tuple(scale_TG.shape)} != {(T, D // GROUP)}"
    return (q_TD.double().view(T, D // GROUP, GROUP) * scale_TG.double()[..., None]).view(T, D)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = (GROUP, GROUP)) -> tuple[int, ...]:
    """Shape of the scales of a weight of `shape`: [..., N, K] -> [..., ceil(N / bn), ceil(K / bk)]."""
    *lead, N, K = shape
    return (*lead, math.ceil(N / block[0]), math.ceil(K / block[1]))


def quant_weight_blocks_ref(w_NK: torch.Tensor, block: tuple[int, int] = (GROUP, GROUP)) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [..., N, K] float -> (float8_e4m3fn [..., N, K], scale [..., n, k] float32), one scale per
    bn x bk block (edge blocks partial), the layout of DeepSeek-V3's `weight_scale_inv`:
        w[i, j] ≈ q[i, j] * scale[i // bn, j // bk],  scale = max(amax of the block, EPS) / 448.
    The one FP8 convention of moeplace, for weights as for activations: an all-zero block gets the
    finite scale EPS / 448 and quantises to zeros (a checkpoint never holds a zero scale)."""
    assert w_NK.dim() >= 2 and w_NK.is_floating_point(), f"need a float [..., N, K] weight, got {w_NK.dtype} {tuple(w_NK.shape)}"
    *lead, N, K = w_NK.shape
    (bn, bk), (n, k) = block, scale_shape((N, K), block)
    padded = torch.zeros(*lead, n * bn, k * bk, dtype=torch.float32, device=w_NK.device)
    padded[..., :N, :K] = w_NK.float()  # zero padding leaves each edge block's amax as it is
    blocks = padded.reshape(*lead, n, bn, k, bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(EPS) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*lead, n * bn, k * bk)[..., :N, :K].contiguous(), scale


def dequant_weight_blocks_ref(q_NK: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (GROUP, GROUP),
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Inverse of `quant_weight_blocks_ref`: [..., N, K] in `dtype` (computed in float64 for float64,
    else in float32)."""
    assert q_NK.dtype == FP8, f"weight must be float8_e4m3fn, got {q_NK.dtype}"
    assert scale.shape == scale_shape(tuple(q_NK.shape), block), \
        f"scale {tuple(scale.shape)} does not fit weight {tuple(q_NK.shape)} in {block} blocks"
    N, K = q_NK.shape[-2:]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale_NK = scale.to(compute).repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return (q_NK.to(compute) * scale_NK[..., :N, :K]).to(dtype)
