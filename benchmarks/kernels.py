"""Benchmark moeplace's FP8 grouped expert GEMMs against the torch paths at DeepSeek-V3 shapes, and write
the measured dispatch table (moeplace/kernels/gemm_table.json) from its sweep.

    python benchmarks/kernels.py [--counts FILE | --traces DIR] [--table OUT.json] [--json ROWS.json]
    python benchmarks/kernels.py --cpu-smoke --table /tmp/t.json     # tiny shapes, Triton interpreter

Per scenario (prefill 4096×8 routed rows, decode 128×8; all 256 experts on one GPU, or the 32 local
experts of an EP8 rank) the rows per expert follow a real DeepSeek-V3 layer (--counts: a derived
per-expert count file, see `write_counts`; --traces: ../shared sglang-dsv3-ep-statistics), else a
synthetic Zipf law (the output says which). Per GEMM (gate/up N 4096 K 7168, down N 7168 K 2048, and
gate/up with the fused SwiGLU+requant epilogue) it times every candidate of the sweep (Triton pointer
kernel, persistent TMA kernel with and without warp specialisation, torch `_scaled_mm` per expert), the
baselines (the per-expert loop with operands prepared outside the timing, eager and CUDA graph; a dense
`_scaled_mm` of the same rows: the ceiling), then `fused_moe` end to end (decode also replayed from a
CUDA graph). Winners go to the table, keyed by (kind, rows-per-expert bucket, N, K) and the card.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before torch: a CUDA build of torch imports Triton, which then reads it
    os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`
from kernels_inputs import blockwise_mm, fp8_weights, loop_baseline, sorted_rows  # noqa: E402
from kernels_sweep import fits, occupancy_note, smem_estimate, sweep, takes  # noqa: E402
from kernels_timing import Rows, agreement, copy_bandwidth_gbs, graphed, print_summary, rel_err, stage_ms  # noqa: E402

HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # datasheet, SXM parts
TOPK, LAYER = 8, 30  # LAYER: a middle MoE layer; EP8 rank 0 holds its experts 0..31
TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "sglang-dsv3-ep-statistics"
GPU_SCENARIOS = [  # name, trace file, routed rows M, experts E; most important first (a run may stop early)
    ("prefill E32", "prefill_in4096.json", 4096 * TOPK, 32),
    ("decode E32", "decode_in1000out1000.json", 128 * TOPK, 32),
    ("decode E256", "decode_in1000out1000.json", 128 * TOPK, 256),
    ("prefill E256", "prefill_in4096.json", 4096 * TOPK, 256),
]
GPU_SHAPE = dict(D=7168, F=2048)
SMOKE_SCENARIOS = [("prefill E4", "prefill_in4096.json", 96, 4),
                   ("decode E6", "decode_in1000out1000.json", 24, 6)]
SMOKE_SHAPE = dict(D=256, F=128)


# ---------------------------------------------------------------- inputs


def write_counts(traces: Path, out: Path) -> None:
    """The per-expert row counts of LAYER for each scenario's trace file: all the benchmark reads of them."""
    files = {f for _, f, _, _ in GPU_SCENARIOS}
    out.write_text(json.dumps({f: json.loads((traces / f).read_text())["logical_count"][LAYER] for f in files}))


def expert_counts(source: dict | None, trace: str, M: int, E: int, gen) -> torch.Tensor:
    """M routed rows over E experts: drawn from the layer's real per-expert load, or Zipf(1) if none."""
    if source is not None:
        p = torch.tensor(source[trace][:E], dtype=torch.float64)
    else:
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)[torch.randperm(E, generator=gen)]
    return torch.bincount(torch.multinomial(p, M, replacement=True, generator=gen), minlength=E)


# ---------------------------------------------------------------- one GEMM shape


def check_candidate(kind, cfg, a, a_s, w, w_s, offsets, ref, ref_rows) -> tuple[bool, str]:
    """(acceptable, note): relative error on the first rows against float64 (fp32 out for Triton, within
    2e-4; bf16 out for the torch loop, within 1e-2; the SwiGLU outputs dequantised, within 3e-2)."""
    from moeplace.kernels.fp8_quant import dequant_rows_ref
    from moeplace.kernels.gemm_table import Backend, GemmKind
    from moeplace.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_swiglu_fp8
    try:
        if kind is GemmKind.swiglu:
            q, s = grouped_gemm_swiglu_fp8(a, a_s, w, w_s, offsets, cfg)
            err, bound = rel_err(dequant_rows_ref(q[:ref_rows], s[:ref_rows]), ref), 3e-2
        else:
            torch_loop = cfg.backend is Backend.torch_loop
            out = grouped_gemm_fp8(a, a_s, w, w_s, offsets, torch.bfloat16 if torch_loop else torch.float32, cfg)
            err, bound = rel_err(out[:ref_rows], ref), (1e-2 if torch_loop else 2e-4)
    except Exception as exc:
        return False, f"check failed: {type(exc).__name__}: {str(exc)[:100]}"
    return err < bound, f"rel err {err:.1e}" + ("" if err < bound else f" > {bound:.0e}: REJECTED")


def gemm_sweep(rows: Rows, kind, gemm, counts, w, w_s, cands, dev, hbm, deadline):
    """Time every candidate for one GEMM (the torch loop twice: offsets on the device only, and also on the
    host); returns the TableEntry of winners and all timings, among candidates whose numerics pass
    `check_candidate` (None if none did)."""
    from moeplace.kernels.fp8_quant import dequant_rows_ref
    from moeplace.kernels.gemm_table import Backend, GemmKind
    from moeplace.kernels.grouped_gemm import grouped_gemm_ref, grouped_gemm_swiglu_ref
    E, N, K = w.shape
    a, a_s, offsets = sorted_rows(counts, K, dev)
    host = offsets.tolist()
    M, active = a.shape[0], int((counts > 0).sum())
    flops, wbytes = 2.0 * M * N * K, active * N * K * (1 + 4 / 128**2)
    ref_rows = min(M, 2048)
    ref_args = (a[:ref_rows], a_s[:ref_rows], w, w_s, offsets.clamp(max=ref_rows))
    if kind is GemmKind.swiglu:
        ref = dequant_rows_ref(*grouped_gemm_swiglu_ref(*ref_args))
    else:
        ref = grouped_gemm_ref(*ref_args)
    timings = {}
    for cfg in cands:
        if not takes(kind, cfg):
            continue
        if not fits(kind, cfg):
            kb = smem_estimate(kind, cfg) >> 10
            print(f"  {cfg.label}: skipped, {cfg.programs_per_sm} programs of ~{kb} KB do not fit an SM's shared memory")
            continue
        if time.monotonic() > deadline:
            print(f"  (time budget spent: {cfg.label} not timed)")
            continue
        ok, note = check_candidate(kind, cfg, a, a_s, w, w_s, offsets, ref, ref_rows)
        if ok:
            note += occupancy_note(kind, cfg, a, a_s, w, w_s, offsets)
        loop = cfg.backend is Backend.torch_loop
        for offsets_host in ((None, host) if loop else (None,)):
            label = cfg.label + (" host offsets" if offsets_host else "")
            call = gemm_call(kind, a, a_s, w, w_s, offsets, cfg, offsets_host)
            ms = rows.add(gemm, ("" if loop else "ours ") + label, call, dev, flops, wbytes, hbm, note)
            if ms is not None and ok:
                timings[label] = ms
    entry = pick_winners(cands, timings)
    if kind is GemmKind.plain and dev == "cuda":
        loop = loop_baseline(a, a_s, w, w_s, offsets)
        rows.add(gemm, f"baseline loop _scaled_mm ({active} experts)", loop, dev, flops, wbytes, hbm)
        try:
            rows.add(gemm, "baseline loop, CUDA graph", graphed(loop), dev, flops, wbytes, hbm)
        except Exception as exc:
            print(f"  loop graph failed: {exc}"[:200])
        pad = -M % 4
        dense = (torch.cat([a, a.new_zeros(pad, K)]), torch.cat([a_s, a_s.new_ones(pad, K // 128)]).t().contiguous().t(),
                 w[0], w_s[0])
        rows.add(gemm, f"baseline dense _scaled_mm {M + pad}x{N}x{K}", lambda: blockwise_mm(*dense), dev, flops,
                 wbytes, hbm, "ceiling")
    return entry, timings


def gemm_call(kind, a, a_s, w, w_s, offsets, cfg, offsets_host):
    """The timed call: one grouped GEMM as fused_moe runs it (bf16 out for the plain kind)."""
    from moeplace.kernels.gemm_table import GemmKind
    from moeplace.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_swiglu_fp8
    if kind is GemmKind.swiglu:
        return lambda: grouped_gemm_swiglu_fp8(a, a_s, w, w_s, offsets, cfg, offsets_host)
    return lambda: grouped_gemm_fp8(a, a_s, w, w_s, offsets, torch.bfloat16, cfg, offsets_host)


def pick_winners(cands, timings: dict[str, float]):
    """TableEntry of the fastest accepted candidates: overall with device offsets (the torch loop's timing
    includes its host sync), overall with host offsets, and among the Triton configs; None if no Triton
    config was accepted (every table entry needs one for CUDA graph captures)."""
    from moeplace.kernels.gemm_table import Backend, TableEntry
    triton = [(timings[c.label], i) for i, c in enumerate(cands) if c.backend is not Backend.torch_loop
              and c.label in timings]
    if not triton:
        return None
    loops = [c for c in cands if c.backend is Backend.torch_loop]
    fastest = lambda pairs: cands[min(pairs)[1]]  # noqa: E731
    device = triton + [(timings[c.label], cands.index(c)) for c in loops if c.label in timings]
    host = triton + [(timings[c.label + " host offsets"], cands.index(c)) for c in loops
                     if c.label + " host offsets" in timings]
    return TableEntry(best=fastest(device), best_triton=fastest(triton), best_host=fastest(host))


# ---------------------------------------------------------------- fused_moe end to end


def moe_rows(rows: Rows, counts, weights, chosen, graph: bool, dev, hbm, D) -> tuple[float | None, ...]:
    """fused_moe end to end and its stages with the sweep's winners `chosen` (gate/up+SwiGLU, down
    TableEntry): offsets on the device only, and also on the host (prefill: the EP path's case); with
    `graph` (decode), also the best Triton configs replayed from a CUDA graph. Returns the eager ms
    (device offsets, host offsets; None where not measured or where the host winners are the same)."""
    from moeplace.kernels.fused_moe import fused_moe
    from moeplace.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_swiglu_fp8
    from moeplace.kernels.permute import moe_routing_plan, permute_quant, unpermute_combine
    w13, w13_s, w2, w2_s = weights
    M, E, F = int(counts.sum()), counts.numel(), w2.shape[2]
    ids = torch.repeat_interleave(torch.arange(E), counts)[torch.randperm(M)].view(-1, TOPK).to(torch.int32).to(dev)
    x = torch.randn(ids.shape[0], D, device=dev, dtype=torch.bfloat16)
    w = torch.rand(ids.shape[0], TOPK, device=dev)
    host = [0, *counts.cumsum(0).tolist()]  # what the routing plan computes on the device from these ids
    flops, wbytes = 6.0 * M * D * F, int((counts > 0).sum()) * 3 * D * F
    cfgs = tuple(e.best for e in chosen)
    plan = moe_routing_plan(ids, E)
    a, a_s = permute_quant(x, plan)
    g, g_s = grouped_gemm_swiglu_fp8(a, a_s, w13, w13_s, plan.expert_offsets_E1, cfgs[0])
    y = grouped_gemm_fp8(g, g_s, w2, w2_s, plan.expert_offsets_E1, torch.bfloat16, cfgs[1])
    for name, fn in (("routing plan (1 launch)", lambda: moe_routing_plan(ids, E)),
                     ("permute+quant", lambda: permute_quant(x, plan)),
                     ("unpermute+combine", lambda: unpermute_combine(y, plan, w))):
        rows.add("stage", name, fn, dev)
    eager = lambda: fused_moe(x, ids, w, w13, w13_s, w2, w2_s, cfgs)  # noqa: E731
    device_ms = rows.add("fused_moe", f"end to end ({cfgs[0].label} | {cfgs[1].label})", eager, dev, flops, wbytes,
                         hbm)
    stages = stage_ms(lambda mark: fused_moe(x, ids, w, w13, w13_s, w2, w2_s, cfgs, on_stage=mark), dev)
    print("  fused_moe stages in one pass (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
          + f"; sum {sum(stages.values()):.3f}", flush=True)
    rows.all.append(dict(scenario=rows.scenario, gemm="fused_moe stages", variant="in one pass", stages_ms=stages))
    host_cfgs, host_ms = tuple(e.best_host for e in chosen), None
    if not graph and (host_cfgs != cfgs or dev == "cpu"):  # the smoke run takes this path too
        with_host = lambda: fused_moe(x, ids, w, w13, w13_s, w2, w2_s, host_cfgs, host)  # noqa: E731
        host_ms = rows.add("fused_moe", f"end to end, host offsets ({host_cfgs[0].label} | {host_cfgs[1].label})",
                           with_host, dev, flops, wbytes, hbm, agreement(with_host, eager))
    if graph and dev == "cuda":
        graph_cfgs = tuple(e.best_triton for e in chosen)
        out = torch.empty_like(x)
        replay = graphed(lambda: out.copy_(fused_moe(x, ids, w, w13, w13_s, w2, w2_s, graph_cfgs)))
        replay()
        err = rel_err(out, fused_moe(x, ids, w, w13, w13_s, w2, w2_s, graph_cfgs))
        rows.add("fused_moe", f"CUDA graph replay ({graph_cfgs[0].label} | {graph_cfgs[1].label})", replay, dev,
                 flops, wbytes, hbm, f"vs eager {err:.1e}")
    return device_ms, host_ms


# ---------------------------------------------------------------- main


def run_scenario(name, trace, M, E, shape, source, weights, args, dev, hbm, all_rows, entries, deadline):
    from moeplace.kernels.gemm_table import GemmKind, rows_bucket, table_row
    gen = torch.Generator().manual_seed(0)
    counts = expert_counts(source, trace, M, E, gen)
    print(f"\n== {name}: {M} rows, {int((counts > 0).sum())}/{E} experts used, rows per expert max "
          f"{int(counts.max())} min {int(counts.min())} ({trace} layer {LAYER} or Zipf: see above)", flush=True)
    rows, (w13, w13_s, w2, w2_s) = Rows(name, all_rows), weights
    cands = sweep(M / E, args.cpu_smoke)
    chosen = {}
    for kind, gemm, w, ws in ((GemmKind.plain, "gate/up", w13, w13_s), (GemmKind.plain, "down", w2, w2_s),
                              (GemmKind.swiglu, "gate/up+SwiGLU", w13, w13_s)):
        entry, timings = gemm_sweep(rows, kind, gemm, counts, w, ws, cands, dev, hbm, deadline)
        if entry is not None:
            chosen[gemm] = (kind, w.shape[1], w.shape[2], entry, timings)
    if "gate/up+SwiGLU" in chosen and "down" in chosen:
        moe = (chosen["gate/up+SwiGLU"][3], chosen["down"][3])
        device_ms, host_ms = moe_rows(rows, counts, weights, moe, name.startswith("decode"), dev, hbm, shape["D"])
        if host_ms is not None and device_ms is not None and host_ms >= device_ms:
            # Each GEMM timed alone lets the host run ahead; fused_moe issues both loops and its other
            # kernels back to back, where the loops' per-expert host work can leave the GPU waiting.
            print(f"  fused_moe with the host-offsets winners {host_ms:.3f} ms >= {device_ms:.3f} ms without: "
                  "the table keeps the device-offsets winners for host offsets too", flush=True)
            chosen = {g: (*c[:3], replace(c[3], best_host=c[3].best), c[4]) for g, c in chosen.items()}
    for kind, N, K, entry, timings in chosen.values():
        entries.append(table_row(kind, rows_bucket(M / E), N, K, entry, timings))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=Path, help="per-expert counts written by --write-counts")
    ap.add_argument("--traces", type=Path, default=TRACES)
    ap.add_argument("--write-counts", type=Path, help="derive the counts file from --traces and exit")
    ap.add_argument("--table", type=Path, help="write the measured dispatch table here")
    ap.add_argument("--json", type=Path, help="write all rows here")
    ap.add_argument("--scenarios", default="all", help="comma-separated names (e.g. 'decode E32') or all")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop timing candidates after this long")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, Triton's interpreter")
    args = ap.parse_args()
    if args.write_counts:
        return write_counts(args.traces, args.write_counts)
    if args.cpu_smoke:  # (TRITON_INTERPRET is set above, before anything imports Triton)
        torch.manual_seed(0)  # the same operands every smoke run: its numerics checks are reproducible
    deadline = time.monotonic() + args.budget_s
    import triton
    dev = "cpu" if args.cpu_smoke else "cuda"
    assert dev == "cpu" or torch.cuda.is_available(), "needs a CUDA GPU (or --cpu-smoke)"
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    hbm = next((v for k, v in HBM_PEAK_GBS.items() if k in card), 3350.0)
    copy_gbs = copy_bandwidth_gbs() if dev == "cuda" else float("nan")
    source = json.loads(args.counts.read_text()) if args.counts and args.counts.is_file() else None
    if source is None and (args.traces / GPU_SCENARIOS[0][1]).is_file():
        source = {f: json.loads((args.traces / f).read_text())["logical_count"][LAYER] for _, f, _, _ in GPU_SCENARIOS}
    print(f"{card}, torch {torch.__version__}, Triton {triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
          f"HBM datasheet {hbm:.0f} GB/s, measured copy (read+write) {copy_gbs:.0f} GB/s; rows per expert: "
          f"{'DeepSeek-V3 layer %d' % LAYER if source else 'SYNTHETIC Zipf(1)'}", flush=True)
    scenarios, shape = (SMOKE_SCENARIOS, SMOKE_SHAPE) if args.cpu_smoke else (GPU_SCENARIOS, GPU_SHAPE)
    if args.scenarios != "all":  # in the order named: a run whose time budget runs out keeps the first ones
        by_name = {s[0]: s for s in scenarios}
        scenarios = [by_name[n.strip()] for n in args.scenarios.split(",") if n.strip() in by_name]
    all_rows, entries, weights = [], [], {}
    for name, trace, M, E in scenarios:
        if E not in weights:
            weights.clear()
            torch.cuda.empty_cache() if dev == "cuda" else None
            D, F = shape["D"], shape["F"]
            weights[E] = (*fp8_weights(E, 2 * F, D, dev), *fp8_weights(E, D, F, dev))
        run_scenario(name, trace, M, E, shape, source, weights[E], args, dev, hbm, all_rows, entries, deadline)
        if args.json:  # after every scenario: a run cut short keeps what it measured
            args.json.write_text(json.dumps(dict(card=card, copy_gbs=copy_gbs, hbm_gbs=hbm, rows=all_rows), indent=1))
    if args.table:
        from moeplace.kernels.gemm_table import write_table
        write_table(args.table, card, entries, dict(torch=torch.__version__, triton=triton.__version__,
                                                    date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv)))
    print_summary(all_rows, hbm, copy_gbs)


if __name__ == "__main__":
    main()
