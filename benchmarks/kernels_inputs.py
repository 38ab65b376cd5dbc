"""Operands of benchmarks/kernels.py at DeepSeek-V3 shapes (random FP8 weights with block scales,
activations in the sorted layout) and its torch baselines (one block-scaled `_scaled_mm`, and the
per-expert loop of them)."""

import torch


def fp8_weights(E, N, K, dev):
    """Random block-quantised weights, built one expert at a time (11 GB at E 256 on the GPU)."""
    from moeplace.kernels.fp8_quant import FP8, quant_weight_blocks_ref
    q = torch.empty(E, N, K, dtype=FP8, device=dev)
    s = torch.empty(E, N // 128, K // 128, dtype=torch.float32, device=dev)
    for e in range(E):
        q[e], s[e] = quant_weight_blocks_ref(torch.randn(N, K, device=dev) / K**0.5)
    return q, s


def sorted_rows(counts, K, dev):
    """Activations already in the sorted layout: fp8 rows and per-128 scales, plus the offsets."""
    from moeplace.kernels.fp8_quant import FP8
    M = int(counts.sum())
    a = (torch.randn(M, K, device=dev) * 8).to(FP8)
    a_s = torch.rand(M, K // 128, device=dev) * 0.01 + 0.001
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    return a, a_s, offsets.to(dev)


def blockwise_mm(a, a_s, w, w_s):
    """torch._scaled_mm with DeepSeek scales: a [m, K] with 1×128 scales [m, K/128] stored outer-dim-major
    (stride (1, m)), w [N, K] with 128×128 scales [N/128, K/128] (passed transposed, as torch checks)."""
    return torch._scaled_mm(a, w.t(), a_s, w_s.t(), out_dtype=torch.bfloat16)


def loop_baseline(a, a_s, w, w_s, offsets):
    """The per-expert loop with its operands built outside the timed region (rows padded to a multiple of
    4): what the issue's targets compare against; it favours the loop (no host sync, no padding)."""
    off = offsets.tolist()
    calls = []
    for e, (lo, hi) in enumerate(zip(off[:-1], off[1:])):
        if hi > lo:
            pad = -(hi - lo) % 4
            ae = torch.cat([a[lo:hi], a.new_zeros(pad, a.shape[1])])
            se = torch.cat([a_s[lo:hi], a_s.new_ones(pad, a_s.shape[1])])
            calls.append((ae, se.t().contiguous().t(), w[e], w_s[e]))
    return lambda: [blockwise_mm(*c) for c in calls]
