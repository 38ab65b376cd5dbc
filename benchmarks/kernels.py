"""Benchmark moeplace's FP8 grouped expert GEMMs on a GPU against the torch paths, DeepSeek-V3 shapes.

    python benchmarks/kernels.py [--traces DIR] [--quick] [--json OUT.json]

Per scenario (prefill ≈ 4096×8 routed rows, decode ≈ 128×8; 256 experts on one GPU, or the 32 local
experts of an EP8 rank), expert row counts are drawn from a real DeepSeek-V3 layer
(../shared/traces/sglang-dsv3-ep-statistics). For the gate/up (N 4096, K 7168) and down (N 7168, K 2048)
GEMMs it times, in the same process: ours over a few tile configs; a loop of torch._scaled_mm per expert
with DeepSeek block scales (eager, and replayed from a CUDA graph); torch._scaled_grouped_mm (row-wise
scales); a dense _scaled_mm of the same total rows (the practical ceiling). Then fused_moe end to end.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from moeplace.kernels.fp8_quant import FP8, quant_weight_blocks_ref
from moeplace.kernels.fused_moe import fused_moe
from moeplace.kernels.grouped_gemm import GemmConfig, grouped_gemm_fp8, grouped_gemm_ref, grouped_gemm_swiglu_fp8
from moeplace.kernels.permute import moe_routing_plan, permute_quant, unpermute_combine

HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # datasheet, SXM parts
D, F, TOPK = 7168, 2048, 8
TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "sglang-dsv3-ep-statistics"
SCENARIOS = [  # name, trace file, rows M, experts E (256 = all on one GPU, 32 = one EP8 rank)
    ("prefill E256", "prefill_in4096.json", 4096 * TOPK, 256),
    ("decode E256", "decode_in1000out1000.json", 128 * TOPK, 256),
    ("prefill E32", "prefill_in4096.json", 4096 * TOPK, 32),
    ("decode E32", "decode_in1000out1000.json", 128 * TOPK, 32),
]
LAYER = 30  # a middle MoE layer; EP8 rank 0 holds its experts 0..31
SWEEP = {  # GemmConfig(block_m, block_n, group_m, num_warps, num_stages)
    "prefill": [GemmConfig(128, 128, 8, 8, 4), GemmConfig(128, 128, 8, 8, 5), GemmConfig(128, 128, 16, 8, 4),
                GemmConfig(64, 128, 8, 4, 4), GemmConfig(64, 128, 8, 8, 4), GemmConfig(128, 64, 8, 4, 4),
                GemmConfig(64, 256, 8, 8, 3)],
    "decode": [GemmConfig(16, 128, 1, 4, 4), GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4),
               GemmConfig(16, 64, 1, 4, 6), GemmConfig(64, 64, 1, 4, 6)],
}


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """The card's practical HBM ceiling: a 2 GiB device copy, bytes read plus bytes written."""
    src = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


def expert_counts(trace_file: Path, M: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """M routed rows over E experts, drawn from the layer's real per-expert load."""
    p = torch.tensor(json.loads(trace_file.read_text())["logical_count"][LAYER][:E], dtype=torch.float64)
    return torch.bincount(torch.multinomial(p, M, replacement=True, generator=gen), minlength=E)


def fp8_weights(E, N, K, gen):
    """Random block-quantised weights, built one expert at a time on the GPU (11 GB at E 256)."""
    q = torch.empty(E, N, K, dtype=FP8, device="cuda")
    s = torch.empty(E, N // 128, K // 128, dtype=torch.float32, device="cuda")
    for e in range(E):
        q[e], s[e] = quant_weight_blocks_ref(torch.randn(N, K, device="cuda") / K**0.5)
    return q, s


def sorted_rows(counts, K, gen):
    """Activations already in the sorted layout: fp8 rows and per-128 scales, plus the offsets."""
    M = int(counts.sum())
    a = (torch.randn(M, K, device="cuda") * 8).to(FP8)
    a_s = torch.rand(M, K // 128, device="cuda") * 0.01 + 0.001
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    return a, a_s, offsets.cuda()


def blockwise_mm(a, a_s, w, w_s):
    """torch._scaled_mm with DeepSeek scales: a [m, K] with 1×128 scales [m, K/128] stored outer-dim-major
    (stride (1, m)), w [N, K] with 128×128 scales [N/128, K/128] (passed transposed, as torch checks)."""
    return torch._scaled_mm(a, w.t(), a_s, w_s.t(), out_dtype=torch.bfloat16)


def rowwise_mm(a, a_s, w, w_s):
    """Fallback where blockwise scales are unsupported: one scale per row of a and per column of w."""
    return torch._scaled_mm(a, w.t(), a_s, w_s, out_dtype=torch.bfloat16)


def expert_operands(a, a_s, w, w_s, lo, hi, blockwise):
    """One expert's operands for torch._scaled_mm, rows padded to a multiple of 4 (cuBLAS asks for it)."""
    pad = -(hi - lo) % 4
    ae = torch.cat([a[lo:hi], a.new_zeros(pad, a.shape[1])])
    se = torch.cat([a_s[lo:hi], a_s.new_ones(pad, a_s.shape[1])])
    if blockwise:
        return ae, se.t().contiguous().t(), w, w_s
    return ae, se.amax(1, keepdim=True), w, w_s.amax(2).amax(1).expand(w.shape[0]).reshape(1, -1).contiguous()


def prepare_loop(a, a_s, w, w_s, offsets):
    """The per-expert loop baseline, operands built outside the timed region (this favours the loop; a
    real one also needs the counts on the host, one sync per layer). Block scales if torch has them."""
    off = offsets.tolist()
    spans = [(e, lo, hi) for e, (lo, hi) in enumerate(zip(off[:-1], off[1:])) if hi > lo]
    for blockwise, mm in ((True, blockwise_mm), (False, rowwise_mm)):
        calls = [expert_operands(a, a_s, w[e], w_s[e], lo, hi, blockwise) for e, lo, hi in spans]
        try:
            mm(*calls[0])
        except RuntimeError as exc:
            print(f"  (blockwise _scaled_mm failed, falling back to row-wise: {str(exc)[:120]})")
            continue
        return (lambda: [mm(*c) for c in calls]), ("block scales" if blockwise else "ROW-WISE scales")
    raise RuntimeError("neither blockwise nor row-wise torch._scaled_mm runs here")


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def gemm_rows(name, kind, counts, w, w_s, gen, sweep, hbm_gbs):
    """All variants of one GEMM shape; returns result rows (dicts)."""
    E, N, K = w.shape
    a, a_s, offsets = sorted_rows(counts, K, gen)
    M, active = a.shape[0], int((counts > 0).sum())
    flops = 2.0 * M * N * K
    weight_bytes = active * (N * K + (N // 128) * (K // 128) * 4)
    rows = []

    def add(variant, fn, note=""):
        try:
            ms = bench_ms(fn)
        except Exception as exc:  # a baseline this torch/cuBLAS doesn't support: say so, keep going
            rows.append(dict(scenario=name, gemm=kind, variant=variant, error=f"{type(exc).__name__}: {exc}"[:160]))
            return None
        rows.append(dict(scenario=name, gemm=kind, variant=variant, ms=ms, tflops=flops / ms / 1e9,
                         weight_gbs=weight_bytes / ms / 1e6, weight_pct_hbm=100 * weight_bytes / ms / 1e6 / hbm_gbs, note=note))
        return ms

    # correctness at full size, once: ours against the float64 reference on a few experts' rows
    ref_rows = min(M, 2048)
    ours = grouped_gemm_fp8(a, a_s, w, w_s, offsets, torch.float32)
    ref = grouped_gemm_ref(a[:ref_rows], a_s[:ref_rows], w, w_s, offsets.clamp(max=ref_rows))
    err = rel_err(ours[:ref_rows], ref)
    best = None
    for cfg in sweep:
        ms = add(f"ours m{cfg.block_m} n{cfg.block_n} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}",
                 lambda cfg=cfg: grouped_gemm_fp8(a, a_s, w, w_s, offsets, torch.bfloat16, cfg), f"rel err {err:.1e}")
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, cfg)
    if kind == "gate/up":
        for cfg in [c for c in sweep if c.block_n == 128]:
            add(f"ours+SwiGLU+quant m{cfg.block_m} w{cfg.num_warps} s{cfg.num_stages}",
                lambda cfg=cfg: grouped_gemm_swiglu_fp8(a, a_s, w, w_s, offsets, cfg), "epilogue fused")
    loop, loop_kind = prepare_loop(a, a_s, w, w_s, offsets)
    e0 = int(torch.nonzero(counts)[0])  # the loop's first output is expert e0's rows: same numbers as ours?
    lo, hi = int(offsets[e0]), int(offsets[e0 + 1])
    loop_err = rel_err(loop()[0][: hi - lo], ours[lo:hi])
    add(f"loop _scaled_mm ({active} experts)", loop, f"{loop_kind}, vs ours {loop_err:.1e}")
    try:
        add("loop _scaled_mm, CUDA graph", graphed(loop), loop_kind)
    except Exception as exc:
        rows.append(dict(scenario=name, gemm=kind, variant="loop _scaled_mm, CUDA graph", error=str(exc)[:160]))
    sa, sb = a_s.amax(1).contiguous(), w_s.amax(2).repeat_interleave(128, 1).contiguous()
    add("_scaled_grouped_mm row-wise", lambda: torch._scaled_grouped_mm(
        a, w.transpose(1, 2), sa, sb, offs=offsets[1:], out_dtype=torch.bfloat16), "row-wise scales")
    dense = expert_operands(a, a_s, w[0], w_s[0], 0, M, blockwise=loop_kind == "block scales")
    add(f"dense _scaled_mm {dense[0].shape[0]}x{N}x{K}", lambda: (blockwise_mm if loop_kind == "block scales" else rowwise_mm)(*dense),
        f"ceiling, {loop_kind}")
    return rows, best


def moe_rows(name, counts, w13, w13_s, w2, w2_s, cfgs, hbm_gbs):
    """fused_moe end to end (routing plan, permute+quant, two GEMMs, combine), and its stages."""
    M, E = int(counts.sum()), counts.numel()
    ids = torch.repeat_interleave(torch.arange(E), counts)[torch.randperm(M)].view(-1, TOPK).to(torch.int32).cuda()
    T = ids.shape[0]
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, TOPK, device="cuda")
    active = int((counts > 0).sum())
    flops, wbytes = 6.0 * M * D * F, active * 3 * D * F
    plan = moe_routing_plan(ids, E)
    a, a_s = permute_quant(x, plan)
    g, g_s = grouped_gemm_swiglu_fp8(a, a_s, w13, w13_s, plan.expert_offsets_E1, cfgs[0])
    y = grouped_gemm_fp8(g, g_s, w2, w2_s, plan.expert_offsets_E1, torch.bfloat16, cfgs[1])
    stages = {
        "routing plan": lambda: moe_routing_plan(ids, E),
        "permute+quant": lambda: permute_quant(x, plan),
        "gate/up+SwiGLU+quant": lambda: grouped_gemm_swiglu_fp8(a, a_s, w13, w13_s, plan.expert_offsets_E1, cfgs[0]),
        "down": lambda: grouped_gemm_fp8(g, g_s, w2, w2_s, plan.expert_offsets_E1, torch.bfloat16, cfgs[1]),
        "unpermute+combine": lambda: unpermute_combine(y, plan, w),
    }
    rows = [dict(scenario=name, gemm="stage", variant=k, ms=bench_ms(f)) for k, f in stages.items()]
    ms = bench_ms(lambda: fused_moe(x, ids, w, w13, w13_s, w2, w2_s, cfgs))
    rows.append(dict(scenario=name, gemm="fused_moe", variant="end to end", ms=ms, tflops=flops / ms / 1e9,
                     weight_gbs=wbytes / ms / 1e6, weight_pct_hbm=100 * wbytes / ms / 1e6 / hbm_gbs))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=Path, default=TRACES)
    ap.add_argument("--quick", action="store_true", help="first config of each sweep only")
    ap.add_argument("--json", type=Path, help="write all rows here")
    ap.add_argument("--scenarios", default="all", help="comma-separated names (e.g. 'decode E32') or all")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    card = torch.cuda.get_device_name()
    hbm = next((v for k, v in HBM_PEAK_GBS.items() if k in card), 3350.0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; HBM datasheet {hbm:.0f} GB/s, "
          f"measured copy (read+write) {copy_gbs:.0f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    all_rows, weights = [], {}
    for name, trace, M, E in SCENARIOS:
        if args.scenarios != "all" and name not in args.scenarios.split(","):
            continue
        if E not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[E] = (*fp8_weights(E, 2 * F, D, gen), *fp8_weights(E, D, F, gen))
        w13, w13_s, w2, w2_s = weights[E]
        counts = expert_counts(args.traces / trace, M, E, gen)
        print(f"\n== {name}: {M} rows, {int((counts > 0).sum())}/{E} experts used, rows per expert "
              f"max {int(counts.max())} min {int(counts.min())} ({trace} layer {LAYER})", flush=True)
        sweep = SWEEP[name.split()[0]][: 1 if args.quick else None]
        best = []
        for kind, w, ws in (("gate/up", w13, w13_s), ("down", w2, w2_s)):
            rows, b = gemm_rows(name, kind, counts, w, ws, gen, sweep, hbm)
            all_rows += rows
            best.append(b[1] if b else None)
            for r in rows:
                print(format_row(r), flush=True)
        up_cfg = GemmConfig(best[0].block_m, 128, best[0].group_m, best[0].num_warps, best[0].num_stages)
        for r in moe_rows(name, counts, w13, w13_s, w2, w2_s, (up_cfg, best[1]), hbm):
            all_rows.append(r)
            print(format_row(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(card=card, copy_gbs=copy_gbs, hbm_gbs=hbm, rows=all_rows), indent=1))


def format_row(r):
    if "error" in r:
        return f"  {r['gemm']:9s} {r['variant']:44s} FAILED {r['error']}"
    extra = f" {r['tflops']:7.1f} TFLOP/s {r['weight_gbs']:7.0f} GB/s ({r['weight_pct_hbm']:4.1f}% HBM)" if "tflops" in r else ""
    return f"  {r['gemm']:9s} {r['variant']:44s} {r['ms']:8.3f} ms{extra} {r.get('note', '')}"


if __name__ == "__main__":
    main()
