"""Operands of the grouped FP8 GEMM tests: block-scaled weights and routed, sorted activations."""

import torch

from moeplace.kernels.fp8_quant import quant_weight_blocks_ref
from moeplace.kernels.permute import moe_routing_plan_ref, permute_quant_ref


def block_weights(E, N, K, gen):
    """Random weights whose 128×128 blocks differ in magnitude (so a wrong block scale shows)."""
    mag = 10.0 ** (torch.rand(E, N // 128, 1, K // 128, 1, generator=gen) * 2 - 1)
    w = (torch.randn(E, N // 128, 128, K // 128, 128, generator=gen) * mag).view(E, N, K) / K**0.5
    return w, *quant_weight_blocks_ref(w)


def sorted_activations(ids, E, K_dim, gen, device):
    """Routed rows of random tokens in the sorted layout; rows past the last expert are NaN, so a kernel
    that reads them (or writes them) is caught."""
    plan = moe_routing_plan_ref(ids, E)
    x = (torch.randn(ids.shape[0], K_dim, generator=gen) * 2).to(torch.bfloat16).to(device)
    a, s = permute_quant_ref(x, plan)
    used = plan.expert_offsets_E1[-1].item()
    a.view(torch.uint8)[used:] = 0x7F
    s[used:] = float("nan")
    return x, plan, a, s, used
