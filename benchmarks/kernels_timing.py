"""Timing and reporting for benchmarks/kernels.py: GPU time of a call (median of back-to-back calls), its
host issue time, CUDA graph replay, and the printed rows and summary."""

import time

import torch


def bench_ms(fn, dev) -> float:
    if dev == "cpu":  # smoke mode: the code path, not a number worth keeping
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_issue_ms(fn, dev) -> float:
    """Host time to issue one call from an idle GPU (a few calls: the launch queue never fills). Above
    the GPU time the call is host-bound, and back-to-back timing alone hides that."""
    if dev == "cpu":
        return float("nan")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / 3 * 1e3


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth_gbs() -> float:
    """The card's practical HBM ceiling: a 2 GiB device copy, bytes read plus bytes written."""
    src = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src), "cuda") / 1e6


class Rows:
    """Result rows of one scenario, printed as they come."""

    def __init__(self, scenario, all_rows):
        self.scenario, self.all = scenario, all_rows

    def add(self, gemm, variant, fn, dev, flops=0.0, weight_bytes=0.0, hbm=1.0, note=""):
        try:
            ms = bench_ms(fn, dev)
        except Exception as exc:  # a candidate this card/compiler/torch can't run: say so, keep going
            row = dict(scenario=self.scenario, gemm=gemm, variant=variant, error=f"{type(exc).__name__}: {exc}"[:200])
            ms = None
        else:
            row = dict(scenario=self.scenario, gemm=gemm, variant=variant, ms=ms, host_ms=host_issue_ms(fn, dev),
                       tflops=flops / ms / 1e9, weight_gbs=weight_bytes / ms / 1e6,
                       weight_pct_hbm=100 * weight_bytes / ms / 1e6 / hbm, note=note)
        self.all.append(row)
        print(format_row(row), flush=True)
        return ms


def stage_ms(run, dev, reps: int = 20) -> dict[str, float]:
    """Milliseconds of each stage of `run`, median over `reps` passes issued back to back (the host runs
    ahead, as in the end-to-end timing): run(mark) calls mark(name) once a stage's kernels are issued, and a
    stage's time runs from the previous mark to its own, the first stage's from the previous pass's last
    (CUDA events; the host clock in the CPU smoke, one pass)."""
    cuda = dev != "cpu"
    reps, warm = (reps, 3) if cuda else (1, 0)

    def now():
        if not cuda:
            return time.perf_counter() * 1e3
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    marks = [(None, now())]
    passes = []
    for _ in range(reps + warm):
        passes.append(len(marks))
        run(lambda name: marks.append((name, now())))
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for i in range(passes[warm], len(marks)):
        (_, start), (name, end) = marks[i - 1], marks[i]
        times.setdefault(name, []).append(start.elapsed_time(end) if cuda else end - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def agreement(fn, ref_fn) -> str:
    """A note: how far fn's output is from ref_fn's (or why it could not run)."""
    try:
        return f"vs device offsets {rel_err(fn(), ref_fn()):.1e}"
    except Exception as exc:
        return f"check failed: {type(exc).__name__}: {str(exc)[:100]}"


def format_row(r):
    if "error" in r:
        return f"  {r['gemm']:15s} {r['variant']:52s} FAILED {r['error']}"
    extra = (f" {r['tflops']:7.1f} TFLOP/s {r['weight_gbs']:6.0f} GB/s ({r['weight_pct_hbm']:4.1f}% HBM)"
             if r.get("tflops") else "")
    host = f" host {r['host_ms']:6.3f}" if r.get("host_ms", float("nan")) == r.get("host_ms") else ""
    return f"  {r['gemm']:15s} {r['variant']:52s} {r['ms']:8.3f} ms{host}{extra} {r.get('note', '')}"


def print_summary(all_rows, hbm, copy_gbs):
    """Per scenario and GEMM: our best against the loop, its graph and the dense ceiling; fused_moe."""
    print("\nSUMMARY (TFLOP/s; decode also % of HBM datasheet / of measured copy)")
    ok = [r for r in all_rows if "ms" in r and r.get("tflops")]
    for scen in dict.fromkeys(r["scenario"] for r in ok):
        for gemm in ("gate/up", "down", "gate/up+SwiGLU", "fused_moe"):
            rs = [r for r in ok if r["scenario"] == scen and r["gemm"] == gemm]
            # a candidate whose numerics check failed is timed (its row says so) but never the best
            ours = [r for r in rs if not r["variant"].startswith("baseline") and "REJECTED" not in r.get("note", "")
                    and not r.get("note", "").startswith("check failed")]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["tflops"])
            base = {k: max((r["tflops"] for r in rs if r["variant"].startswith(k)), default=float("nan"))
                    for k in ("baseline loop _", "baseline loop,", "baseline dense")}
            pct_copy = 100 * best["weight_gbs"] / copy_gbs if copy_gbs == copy_gbs else float("nan")
            print(f"{scen:13s} {gemm:15s} best {best['tflops']:7.1f} [{best['variant'][:44]}] "
                  f"loop {base['baseline loop _']:6.1f} graph {base['baseline loop,']:6.1f} "
                  f"dense {base['baseline dense']:6.1f} | x loop {best['tflops'] / base['baseline loop _']:.2f} "
                  f"of dense {100 * best['tflops'] / base['baseline dense']:.0f}% | HBM "
                  f"{best['weight_pct_hbm']:.0f}% copy {pct_copy:.0f}%")
