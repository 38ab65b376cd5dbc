"""The torch loop backend's helpers: the per-expert scale layout cuBLAS reads, and SiLU·up + requantise.
(The loop itself needs cuBLAS's block-scaled _scaled_mm: test_grouped_gemm's gpu tests.)"""

import torch

from moeplace.kernels.grouped_gemm import swiglu_quant_ref
from moeplace.kernels.torch_gemm import ROW_ALIGN, _scales_by_expert, swiglu_quant


def test_scales_by_expert_are_transposed_and_padded(gen, device):
    counts = [5, 0, 8, 1, 130]
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=device)
    a_s = torch.rand(sum(counts) + 3, 7, generator=gen).to(device)  # 3 rows past the last expert
    flat, base = _scales_by_expert(a_s, offsets), 0
    for e, n in enumerate(counts):
        m = -(-n // ROW_ALIGN) * ROW_ALIGN
        s = flat[base: base + 7 * m].view(7, m).t()  # [m, Kb] with strides (1, m): what cuBLAS checks
        lo = int(offsets[e])
        assert torch.equal(s[:n].cpu(), a_s[lo:lo + n].cpu()) and (s[n:] == 1).all(), f"expert {e}"
        base += 7 * m


def test_swiglu_quant_matches_ref(gen, device, poisoned, rel_err):
    h = (torch.randn(37, 512, generator=gen) * 3).to(device)
    q, s = swiglu_quant(h)
    q_ref, s_ref = swiglu_quant_ref(h)
    # float32 both sides; the kernel's sigmoid and the reference's silu may differ in the last bit
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the fp8 bytes agree"
    assert rel_err(s, s_ref) < 1e-6
