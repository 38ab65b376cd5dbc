"""FP8 block quantisation: round-trip error within the e4m3 bound, the 128-block scale layout."""

from __future__ import annotations

import pytest
import torch

from moeplace.runtime.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise, scale_shape


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (3, 256, 130), (1, 7)])
def test_round_trip_within_e4m3_bound(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    # Blocks of very different magnitudes: each gets its own scale.
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(shape)
    back = dequantize_blockwise(q, scale_inv)
    per_element_scale = scale_inv.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = torch.maximum(w.abs() * 2**-4, per_element_scale * 2**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # The largest element of each block maps to 448 exactly.
    assert back.abs().max() == pytest.approx(w.abs().max().item(), rel=1e-6)


def test_scale_is_per_128_block_deepseek_convention():
    w = torch.ones(256, 130)
    w[128:, :] *= 10.0
    w[:, 128:] *= 0.5
    q, scale_inv = quantize_blockwise(w)
    assert torch.allclose(scale_inv, torch.tensor([[1.0, 0.5], [10.0, 5.0]]) / 448)
    # Every element is its block's maximum: stored as 448, the weight is 448 * scale_inv.
    assert (q.float() == 448).all()
    assert torch.allclose(dequantize_blockwise(q, scale_inv), w)


def test_zero_block_gets_unit_scale_and_dequantises_to_zero():
    q, scale_inv = quantize_blockwise(torch.zeros(130, 128))
    assert (scale_inv == 1).all()
    assert (dequantize_blockwise(q, scale_inv) == 0).all()


def test_scale_shape_rounds_up():
    assert scale_shape((2048, 7168)) == (16, 56)
    assert scale_shape((7168, 2048)) == (56, 16)
    assert scale_shape((5, 129, 1)) == (5, 2, 1)
