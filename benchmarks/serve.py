"""The engine serving a DeepSeek-V3-shaped FP8 model on G GPUs: data-parallel attention with the latent
KV cache, expert-parallel MoE, closed-loop load at several concurrencies, trivial then solved placement
(issue 12).

    # on the GPU machine (benchmarks/device_env.sh first: moeplace and the wheels the image lacks)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python3 benchmarks/serve.py --gpus 2 --moe-layers 2 --levels 64,256,512 --json $OUT/serve.json
    # here, to check the script: the tiny model, gloo, 2 ranks on CPU, seconds per level
    python benchmarks/serve.py --cpu-smoke --json out.json

Steps: `moeplace make-model` (full_loop.py's, reused by a later run with the same arguments; --model
takes an existing folder instead), the trivial placement with 288 / G slots per GPU (256 experts + 32
redundant), then benchmarks/serve_workers.py under torchrun (its docstring: micro timings, the load
on the trivial placement, solve + live reshard, the load on the solved placement). Reported: output
tokens/s per GPU and layer-tokens/s per GPU (tokens/s x MoE layers / GPUs; DeepSeek's published 14.8k
output tokens/s per 8xH800 node over 58 MoE layers is about 107k), TTFT and inter-token latency p50 /
p99 per level, the MoE layer's decode step against reading its slots once, the decode step at 2,048
tokens of context against 128. JSON to --json, a short table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from full_loop import NO_MULTICAST, _model, _trivial_placement  # noqa: E402
from full_loop_steps import device_name, run_cli  # noqa: E402

DEEPSEEK_LAYER_TOKENS_PER_GPU = 14_800 * 58 / 8  # published: 14.8k output tokens/s per 8-GPU node, 58 MoE layers
CPU_SMOKE = dict(gpus=2, device="cpu", levels="4", graph_levels="4", prompt_tokens=24, max_tokens=6, level_seconds=4.0,
                 warmup_seconds=1.0, solve_seconds=1.0, moe_tokens=16, micro_batch=2, iters=2)


def run(args) -> dict:
    if args.cpu_smoke:
        for name, value in CPU_SMOKE.items():
            setattr(args, name, value)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # the ranks share the cores
    start = time.monotonic()
    if args.cpu_smoke and not args.model:  # the embedded tiny model (64 experts), written in seconds
        from moeplace.runtime.tiny import write_tiny_model

        args.model = work / "tiny"
        if not (args.model / "config.json").exists():
            args.model.mkdir(parents=True, exist_ok=True)
            write_tiny_model(args.model, seed=0)
    model = args.model.resolve() if args.model else _model(args, args.routing_trace, work, env)
    model_s = time.monotonic() - start
    from moeplace.runtime.config import ModelConfig

    experts = ModelConfig.load(model).n_routed_experts
    slots = -(-(experts + experts // 8) // args.gpus)  # 1/8 redundant slots (DeepSeek-V3: 256 + 32)
    placement = _trivial_placement(model, args.gpus, slots, work / "trivial.json")
    # beside --json (on a GPU machine: under $OUT), so a run cut short still brings back what it measured
    out = args.json.with_name(args.json.stem + "_ranks.json") if args.json else work / "serve_ranks.json"
    flags = {"--model": model, "--placement": placement, "--levels": args.levels,
             "--solved-levels": args.solved_levels or args.levels, "--prompt-tokens": args.prompt_tokens,
             **({"--graph-levels": args.graph_levels} if args.graph_levels else {}),
             "--max-tokens": args.max_tokens, "--level-seconds": args.level_seconds,
             "--warmup-seconds": args.warmup_seconds, "--solve-seconds": args.solve_seconds,
             "--moe-tokens": args.moe_tokens, "--micro-batch": args.micro_batch, "--iters": args.iters, "--json": out}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
               str(HERE / "serve_workers.py"), *[str(x) for pair in flags.items() for x in pair]]
    command += ["--cpu"] if args.device == "cpu" else []
    run_cli(command, env, work / "serve_workers.log")
    results = {"date": str(date.today()), "device": device_name(args.device), "argv": sys.argv,
               "model": str(model), "model_seconds": model_s, **json.loads(out.read_text())}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results), flush=True)
    return results


def table(r: dict) -> str:
    m = r["micro"]
    long, short = m["decode_step_ms_ctx2048"], m["decode_step_ms_ctx128"]
    lines = [f"# {r['date']} {r['device']}, {r['gpus']} GPUs, {r['moe_layers']} MoE layers",
             f"MoE layer decode step, {m['moe_tokens_per_rank']} tokens/rank: {m['moe_decode_ms']:.3f} ms = "
             f"{m['moe_vs_read']:.2f}x reading the slots once ({m['slot_bytes'] / 1e9:.2f} GB at "
             f"{m['copy_GBps']:.0f} GB/s copy: {m['read_slots_ms']:.3f} ms; target <= 1.5x)",
             f"decode step, {m['decode_batch_per_rank']} seqs/rank: ctx 2048 {long:.2f} ms vs ctx 128 {short:.2f} ms "
             f"= {long / short:.2f}x (target <= 1.3x); CUDA graph {m['decode_graph_ms_ctx2048']:.2f} vs "
             f"{m['decode_graph_ms_ctx128']:.2f} ms = {m['decode_graph_ms_ctx2048'] / m['decode_graph_ms_ctx128']:.2f}x "
             f"(graph vs eager logits max |diff| {m['decode_graph_vs_eager_max_abs_ctx2048']:.2g})"]
    if "reshard" in r:
        rs = r["reshard"]
        lines.append(f"solve {rs['solve_seconds']:.1f} s, reshard {rs['state']}: {rs['experts_moved']} experts, "
                     f"{rs['bytes_moved'] / 1e9:.2f} GB in {rs['reshard_seconds']:.2f} s")
    lines.append("placement      conc  tok/s/GPU  layer-tok/s/GPU (vs DeepSeek's 107k)  TTFT p50/p99 ms  ITL p50/p99 ms  "
                 "step ms")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for name in ("trivial", "solved", "solved_graphs"):
        for x in r.get(name, []):
            layer = x["layer_tokens_per_s_per_gpu"]
            lines.append(f"{name:13} {x['concurrency']:5d} {x['output_tokens_per_s_per_gpu']:10.1f} {layer:16.0f} "
                         f"({layer / DEEPSEEK_LAYER_TOKENS_PER_GPU:6.1%})"
                         f"   {fmt(x['ttft_ms_p50'], '.0f')}/{fmt(x['ttft_ms_p99'], '.0f')}"
                         f"   {fmt(x['itl_ms_p50'], '.1f')}/{fmt(x['itl_ms_p99'], '.1f')}"
                         f"   {fmt(x['engine_step_ms_mean'], '.1f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="an existing model folder (no make-model)")
    p.add_argument("--routing-trace", type=Path, default=None, help="for make-model (default: its own)")
    p.add_argument("--workdir", type=Path, default=Path(".serve"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--levels", default="64,256,512", help="concurrent sequences, one load level each")
    p.add_argument("--solved-levels", default=None, help="levels on the solved placement (default: --levels)")
    p.add_argument("--graph-levels", default=None, help="then levels with CUDA graphs of the decode step")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--level-seconds", type=float, default=20.0)
    p.add_argument("--warmup-seconds", type=float, default=8.0, help="of each level, left out of its numbers")
    p.add_argument("--solve-seconds", type=float, default=5.0)
    p.add_argument("--moe-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, gloo, short levels: checks the script")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
