import pytest
import torch

from moeplace.kernels.fp8_quant import (dequant_rows_ref, dequant_weight_blocks_ref, per_token_group_quant_fp8,
                                        per_token_group_quant_fp8_ref, quant_weight_blocks_ref)


def random_activations(T, D, gen, dtype=torch.bfloat16):
    # groups of very different magnitudes, as real activations have (outlier channels)
    mag = 10.0 ** (torch.rand(T, D // 128, 1, generator=gen) * 6 - 3)
    return (torch.randn(T, D // 128, 128, generator=gen) * mag).view(T, D).to(dtype)


@pytest.mark.parametrize("T, D, dtype", [(37, 256, torch.bfloat16), (5, 512, torch.float32), (16, 128, torch.float16)])
def test_quant_matches_ref_bitwise(T, D, dtype, gen, device, poisoned):
    x = random_activations(T, D, gen, dtype).to(device)
    x[3 % T, :128] = 0  # one all-zero group: the eps floor must give scale > 0 and zeros
    q, s = per_token_group_quant_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x)
    assert torch.equal(s.cpu(), s_ref.cpu()), "scales differ from the reference"
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8).cpu()), "fp8 bytes differ from the reference"
    assert (s > 0).all() and torch.isfinite(q.float()).all()


def test_quant_strided_rows(gen, device, poisoned):
    big = random_activations(9, 384, gen).to(device)
    x = big[:, :256]  # a row stride larger than D
    q, s = per_token_group_quant_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x.contiguous())
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8).cpu()) and torch.equal(s.cpu(), s_ref.cpu())


@pytest.mark.ref_only
def test_ref_quant_error_within_e4m3(gen, rel_err):
    x = random_activations(64, 512, gen, torch.float32)
    err = rel_err(dequant_rows_ref(*per_token_group_quant_fp8_ref(x)), x)
    assert err < 0.04, f"e4m3 keeps 3 mantissa bits (≤ 2^-4 per element); relative error {err}"
    w = torch.randn(3, 256, 384, generator=gen)
    err = rel_err(dequant_weight_blocks_ref(*quant_weight_blocks_ref(w)), w)
    assert err < 0.04, f"block-quantised weights: relative error {err}"


def test_quant_rejects_bad_shapes(device):
    with pytest.raises(AssertionError, match="not a multiple of 128"):
        per_token_group_quant_fp8(torch.ones(4, 100, device=device))
    with pytest.raises(AssertionError, match="must be \\[T, D\\]"):
        per_token_group_quant_fp8(torch.ones(128, device=device))
