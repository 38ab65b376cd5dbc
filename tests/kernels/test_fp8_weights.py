"""FP8 weight block quantisation (plain torch, no Triton): round-trip error within the e4m3 bound, the
128-block scale layout, the all-zero block convention, and importing without Triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moeplace.kernels.fp8 import EPS, FP8, FP8_MAX, dequant_weight_blocks_ref, quant_weight_blocks_ref, scale_shape


@pytest.mark.ref_only
@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (3, 256, 130), (1, 7)])
@pytest.mark.ref_only
def test_round_trip_within_e4m3_bound(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    # Blocks of very different magnitudes: each gets its own scale.
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])
    q, scale_inv = quant_weight_blocks_ref(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(shape)
    back = dequant_weight_blocks_ref(q, scale_inv, dtype=torch.float32)
    per_element_scale = scale_inv.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = torch.maximum(w.abs() * 2**-4, per_element_scale * 2**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # The largest element of each block maps to 448 exactly.
    assert back.abs().max() == pytest.approx(w.abs().max().item(), rel=1e-6)


@pytest.mark.ref_only
def test_scale_is_per_128_block_deepseek_convention():
    w = torch.ones(256, 130)
    w[128:, :] *= 10.0
    w[:, 128:] *= 0.5
    q, scale_inv = quant_weight_blocks_ref(w)
    assert torch.allclose(scale_inv, torch.tensor([[1.0, 0.5], [10.0, 5.0]]) / 448)
    # Every element is its block's maximum: stored as 448, the weight is 448 * scale_inv.
    assert (q.float() == 448).all()
    assert torch.allclose(dequant_weight_blocks_ref(q, scale_inv, dtype=torch.float32), w)


@pytest.mark.ref_only
def test_zero_block_gets_the_eps_scale_and_dequantises_to_zero():
    q, scale_inv = quant_weight_blocks_ref(torch.zeros(130, 128))
    assert (scale_inv == EPS / FP8_MAX).all() and (scale_inv > 0).all()  # as activations' zero groups
    assert (dequant_weight_blocks_ref(q, scale_inv, dtype=torch.float32) == 0).all()


@pytest.mark.ref_only
def test_scale_shape_rounds_up():
    assert scale_shape((2048, 7168)) == (16, 56)
    assert scale_shape((7168, 2048)) == (56, 16)
    assert scale_shape((5, 129, 1)) == (5, 2, 1)


@pytest.mark.ref_only
def test_the_references_import_and_run_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\n"
            "from moeplace.kernels._triton import HAS_TRITON\n"
            "from moeplace.kernels.fp8 import quant_weight_blocks_ref, per_token_group_quant_fp8_ref\n"
            "assert not HAS_TRITON\n"
            "q, s = quant_weight_blocks_ref(torch.randn(130, 260))\n"
            "print(tuple(s.shape), tuple(per_token_group_quant_fp8_ref(torch.randn(2, 256))[1].shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(2,", "3)", "(2,", "2)"]
