"""Ranks of benchmarks/serve.py, under torchrun: the engine served as `moeplace serve` serves it (every
rank an EPModel with its KV cache, rank 0 the Engine, ranks 1.. `worker_loop`, a live Resharder), driven
in process by a closed-loop load on rank 0 (no HTTP: the numbers are the engine's).

Steps (all ranks together):
 1. micro: device-copy bandwidth; one MoE layer's decode step at --moe-tokens tokens per rank against
    the time to read this rank's expert slots once at that bandwidth; the whole decode step at
    --micro-batch sequences per rank with 128 and 2,048 tokens of context;
 2. load on the trivial placement: for each --levels N, N sequences kept in flight (each finished one
    replaced at once), prompts of --prompt-tokens, --max-tokens each, for --level-seconds; output tokens
    per second, TTFT and inter-token latency from each request's event times, engine step times;
 3. solve a placement from the expert counts collected during step 2 and reshard to it live;
 4. the same load on the solved placement;
 5. with --graph-levels, a new engine whose decode-only steps replay CUDA graphs of the whole step
    (batch buckets from 8, runtime/step_graphs.py), the same load on the solved placement.
Rank 0 writes --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import load_placement
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.kv_cache import CacheShape, KVCache
from moeplace.runtime.model import EPModel
from moeplace.runtime.ranks import worker_loop
from moeplace.runtime.reshard import Resharder
from moeplace.runtime.sampling import SamplingParams
from moeplace.runtime.step_graphs import DecodeStepGraphs
from moeplace.runtime.router_fit import calibration_text
from moeplace.runtime.tokenizer import ByteTokenizer


def timed_ms(fn, iters: int, device: torch.device, group=None) -> float:
    """Median milliseconds of fn() over `iters` runs, every rank starting each run together."""
    times = []
    for _ in range(iters + 2):  # two warm-up runs
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[2:]))


def micro(model: EPModel, args, device: torch.device) -> dict:
    """Step 1: copy bandwidth, the MoE layer at decode size, the decode step at two context lengths."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_ms = timed_ms(lambda: src.clone(), 5, device)
    copy_gbps = 2 * nbytes / copy_ms / 1e6  # read + write
    del src
    moe = model.moe_layers[0]
    slots = (moe.w13_SFD, moe.w13_sinv_Sfd, moe.w2_SDF, moe.w2_sinv_Sdf)
    slot_bytes = sum(t.numel() * t.element_size() for t in slots)
    x_TD = torch.randn(args.moe_tokens, model.config.hidden_size, device=device, dtype=model.dtype)
    with torch.no_grad():
        moe_ms = timed_ms(lambda: moe(x_TD), args.iters, device)
    read_ms = slot_bytes / (copy_gbps * 1e6)
    return {"copy_GBps": copy_gbps, "slot_bytes": slot_bytes, "read_slots_ms": read_ms,
            "moe_decode_ms": moe_ms, "moe_tokens_per_rank": args.moe_tokens, "moe_vs_read": moe_ms / read_ms,
            **decode_ms(model, args.micro_batch, 128, args.iters, device),
            **decode_ms(model, args.micro_batch, 2048, args.iters, device), "decode_batch_per_rank": args.micro_batch}


def decode_ms(model: EPModel, batch: int, context: int, iters: int, device: torch.device) -> dict:
    """The whole decode step (every layer) for `batch` sequences of `context` tokens on each rank: eager
    on the variable-size MoE path, and replayed from a CUDA graph (fixed-capacity path), with the largest
    logit difference between the graph and the same step run eagerly."""
    cfg = model.config
    shape = CacheShape(num_layers=cfg.num_hidden_layers, num_blocks=batch * (context // 64 + 1), block_size=64,
                       width=cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    cache = KVCache(shape, device, model.dtype)
    for seq in range(batch):
        cache.admit(seq, context)
        cache.assume_written(seq, context - 1)
    plan = cache.plan(list(range(batch)), [])  # reused: each run writes the same rows again
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    live = torch.ones(batch, dtype=torch.bool, device=device)
    eager_ms = timed_ms(lambda: model.decode_step(cache, plan, ids), iters, device)
    graphs = DecodeStepGraphs(model, cache)
    fixed = model.decode_step(cache, plan, ids, live)
    diff = float((graphs.run(plan, ids, live) - fixed).abs().max())  # the first run captures
    graph_ms = timed_ms(lambda: graphs.run(plan, ids, live), iters, device)
    del cache, graphs
    return {f"decode_step_ms_ctx{context}": eager_ms, f"decode_graph_ms_ctx{context}": graph_ms,
            f"decode_graph_vs_eager_max_abs_ctx{context}": diff}


class ClosedLoop:
    """`level` requests kept in flight on `engine` (rank 0): each one that ends is replaced at once.
    Every request's event times are kept (its waker runs in the engine's thread after each event)."""

    def __init__(self, engine: Engine, prompts: list[list[int]], level: int, max_tokens: int) -> None:
        self.engine, self.prompts, self.level = engine, prompts, level
        self.params = SamplingParams(max_tokens=max_tokens)
        self.done: list[tuple[float, list[float]]] = []  # (submitted, event times) of ended requests
        self._live: list[tuple[object, float, list[float]]] = []
        self._sent = 0

    def _submit(self) -> None:
        times: list[float] = []
        handle = self.engine.submit(self.prompts[self._sent % len(self.prompts)], self.params)
        handle.set_waker(lambda: times.append(time.perf_counter()))
        self._live.append((handle, time.perf_counter(), times))
        self._sent += 1

    def run(self, seconds: float) -> tuple[float, float]:
        """Keep the level for `seconds`; cancel what is left; returns the (start, end) of the period."""
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            still = []
            for handle, sent, times in self._live:
                if handle.ended:
                    self.done.append((sent, times))
                else:
                    still.append((handle, sent, times))
            self._live = still
            while len(self._live) < self.level:
                self._submit()
            time.sleep(0.01)  # the engine thread needs the GIL more than this loop
        end = time.perf_counter()
        for handle, sent, times in self._live:
            handle.cancel()
        for handle, sent, times in self._live:
            handle.result(timeout=600)
            self.done.append((sent, times))
        return start, end


def level_report(loop: ClosedLoop, start: float, end: float, warmup: float, world: int, moe_layers: int,
                 steps: list) -> dict:
    """Output tokens in [start + warmup, end] per second per GPU; TTFT (ms) of every request of the level
    (the first wave, all submitted at once, included); inter-token latency (ms) of the gaps in the window."""
    lo = start + warmup
    # each ended request's last event is its Finished, every other one a token
    tokens = sum(sum(lo <= t <= end for t in times[:-1]) for _, times in loop.done)
    per_s = tokens / (end - lo)
    ttft = [1e3 * (times[0] - sent) for sent, times in loop.done if len(times) > 1]  # the first wave's too
    itl = [1e3 * (b - a) for _, times in loop.done for a, b in zip(times[:-2], times[1:-1]) if lo <= a and b <= end]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    in_window = [s for s in steps if lo <= s[0] <= end]
    return {"concurrency": loop.level, "output_tokens_per_s": per_s, "output_tokens_per_s_per_gpu": per_s / world,
            "layer_tokens_per_s_per_gpu": per_s * moe_layers / world, "ttft_ms_p50": pct(ttft, 50),
            "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "engine_step_ms_mean": 1e3 * float(np.mean([s[1] for s in in_window])) if in_window else None,
            "sequences_per_step_mean": float(np.mean([s[2] for s in in_window])) if in_window else None,
            "requests_done": len(loop.done)}


def serve_phases(model: EPModel, resharder: Resharder, control, rank: int, world: int, args, results: dict) -> None:
    """Steps 2-5, one engine per configuration: ranks > 0 follow each until rank 0 stops it."""
    per_rank = -(-max(args.levels + args.graph_levels) // world)
    eager = EngineConfig(max_batch=per_rank, max_prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_tokens,
                         queue_limit=max(args.levels + args.graph_levels) + 8, block_size=64,
                         max_prefill_tokens=max(8192, args.prompt_tokens))
    configs = [(eager, [("trivial", args.levels), ("solved", args.solved_levels or args.levels)])]
    if args.graph_levels:
        graphed = dataclasses.replace(eager, decode_bucket=8, decode_graphs=True)
        configs.append((graphed, [("solved_graphs", args.graph_levels)]))
    for config, phases in configs:
        if rank > 0:
            worker_loop(model, control, config, resharder)
            continue
        engine = Engine(model, config, control, eos_id=-1, resharder=resharder)  # every answer max_tokens long
        loop = threading.Thread(target=engine.run, name="engine")
        loop.start()
        try:
            drive(engine, resharder, model, args, world, results, phases)
        finally:
            engine.stop()
            loop.join()


def drive(engine: Engine, resharder: Resharder, model: EPModel, args, world: int, results: dict,
          phases: list[tuple[str, list[int]]]) -> None:
    """Rank 0: the load at each level of each phase ("solved": after solving and resharding live);
    `results` written to --json after each level, so a run cut short keeps what it measured."""
    tok = ByteTokenizer()
    prompts = [tok.encode(calibration_text(20_000 + i, args.prompt_tokens - 1)) for i in range(64)]
    steps, windows = [], []
    engine.on_step = lambda s: steps.append((time.perf_counter(), s.seconds, s.batch))
    engine.on_stats = windows.append
    for name, levels in phases:
        if name == "solved":
            results["reshard"] = reshard_to_solved(engine, resharder, model, windows, args)
        results[name] = []
        for level in levels:
            loop = ClosedLoop(engine, prompts, level, args.max_tokens)
            start, end = loop.run(args.level_seconds)
            results[name].append(level_report(loop, start, end, args.warmup_seconds, world,
                                              len(model.moe_layers), steps))
            print(json.dumps({name: results[name][-1]}), flush=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")


def reshard_to_solved(engine: Engine, resharder: Resharder, model: EPModel, windows: list, args) -> dict:
    """Step 3: solve on the counts collected so far, then reshard live (the engine keeps stepping)."""
    from moeplace.placer.solve import SolveOptions, solve
    from moeplace.trace import Trace

    engine.flush_stats()
    cfg = model.config
    trace = Trace(np.stack([w.stats.counts_LE for w in windows if w.steps]).astype(np.float64),
                  np.array(cfg.moe_layers), cfg.num_experts_per_tok, num_model_layers=cfg.num_hidden_layers,
                  n_group=cfg.n_group, topk_group=cfg.topk_group)
    start = time.monotonic()
    solved = solve([trace], model.placement.topology, SolveOptions(time_limit=args.solve_seconds, workers=1),
                   old=model.placement)
    solve_s = time.monotonic() - start
    job = resharder.submit(solved.placement)
    while not resharder.jobs.get(job.id).state.final:
        time.sleep(0.05)
    status = resharder.jobs.get(job.id)
    return {"solve_seconds": solve_s, "state": status.state, "reshard_seconds": status.seconds,
            "experts_moved": status.experts_moved, "bytes_moved": status.bytes_moved}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--placement", type=Path, required=True)
    p.add_argument("--levels", type=_ints, required=True)
    p.add_argument("--solved-levels", type=_ints, default=None, help="default: --levels")
    p.add_argument("--graph-levels", type=_ints, default=[], help="then on the solved placement, decode graphs")
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--level-seconds", type=float, required=True)
    p.add_argument("--warmup-seconds", type=float, required=True)
    p.add_argument("--solve-seconds", type=float, default=5.0)
    p.add_argument("--moe-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.cpu else "nccl")
    control = dist.new_group(backend="gloo")
    reshard_group = dist.new_group(backend="gloo" if args.cpu else "nccl")
    reshard_control = None if args.cpu else dist.new_group(backend="gloo")
    model = EPModel.load(args.model, load_placement(args.placement), group=dist.group.WORLD, device=device)
    resharder = Resharder(model, reshard_group, rank, control=reshard_control)
    resharder.connect()
    results = {"micro": micro(model, args, device), "moe_layers": len(model.moe_layers), "gpus": world}
    if rank == 0:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    serve_phases(model, resharder, control, rank, world, args, results)
    dist.destroy_process_group()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
