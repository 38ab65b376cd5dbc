"""The whole loop on G GPUs of one machine: a DeepSeek-V3-shaped FP8 model served expert-parallel,
profiled, solved and resharded live while decode-style load keeps coming (issue 8).

    # here (CPU machine, ../shared beside the checkout): the trace layers the model will follow, as
    # derived counts of those layers only (the SGLang files' licence is unstated: they never travel)
    python benchmarks/full_loop.py prepare --moe-layers 4 --out .dsv3
    # on the GPU machine (one command; moeplace and the packages its image lacks installed from wheels:
    # ortools, immutabledict, protobuf, fastapi, starlette, pydantic(-core), annotated-types,
    # typing-inspection, typing-extensions, opentelemetry-api, anyio, uvicorn)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python3 benchmarks/full_loop.py run --gpus 4 --moe-layers 4 --routing-trace .dsv3/routing.safetensors \\
        --json $OUT/full_loop.json
    # here, to check the script: small shapes, gloo, 2 ranks on CPU
    python benchmarks/full_loop.py run --cpu-smoke --json out.json

Steps of `run` (each adds its numbers to --json as it ends, so an interrupted run keeps what it measured):
 1. p2p: NCCL point-to-point bandwidth between the same GPUs (benchmarks/full_loop_workers.py under
    torchrun; benchmarks/reshard.py's ring: every rank sends to the next and receives from the previous
    at once), GB/s per GPU.
 2. model: `moeplace make-model` into --workdir (reused by a later run with the same arguments): 11.3 GB
    of disk per MoE layer at DeepSeek-V3 shapes, and each layer's experts written once, read twice.
 3. serve: `moeplace serve` on G ranks with the trivial placement, the layout a deployment starts
    with when given none: 288 slots = 256 experts + 32 redundant, slot p holds expert p % 256 (so the
    redundant slots copy experts 0..31 whatever their load), 288 / G slots per GPU.
 4. load: --clients threads, each sending one completion after another (a 96-byte prompt of the kind
    of text the routers were fitted on, --max-tokens new tokens), from --warmup-seconds before the first
    profile until the last one ends; the server batches up to --clients sequences per step.
 5. before: `moeplace profile` for --profile-seconds; the engine's step time over it from /metrics.
 6. solve: `moeplace solve` on that trace for G GPUs x 288 / G slots, --from the trivial placement.
 7. apply: `moeplace apply` while the load continues; experts, bytes, seconds from the server; the
    bytes the busiest GPU received (from the plan) against the P2P bandwidth of step 1.
 8. after: `moeplace profile` again, on the new layout.
    Then the layout solved from scratch (any expert may move) is applied the same way.
 9. the load stops; the from-scratch move is undone on the idle server (the same copies, no serving beside
    them); then the server stops: every request must have succeeded (latency of those answered
    during the reshard reported apart); live GPU-load imbalance before / after from the two profiles.
10. moe_layer: the MoE layer alone (full_loop_workers.py under torchrun: EPMoE with random weights,
    timed by benchmarks/moe_layer.py's `time_steps`) for each MoE layer, tokens routed with the
    popularity profiled in step 5: uniform (every slot equally loaded), before (trivial) and after
    (solved), at decode (128 tokens per rank) and prefill (4096) sizes: step time (slowest rank) and
    each GPU's expert time. The server's step mixes prefill and decode of every rank's sequences, so its
    step time is not an MoE step time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # also under `python -P`
from full_loop_report import Results, balance, reshard_numbers, summary  # noqa: E402
from full_loop_steps import device_name, fixed_answers, jsonable, profile, run_cli  # noqa: E402
SHARED_DSV3 = HERE.parents[1] / "shared" / "traces" / "sglang-dsv3-ep-statistics" / "decode_in1000out1000.json"
E, SLOTS = 256, 288
# NVLink multicast stays off (device/KINDS.md): it can take the host's shared GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FIXED_PROMPTS = 8  # greedy answers compared before / after the reshard
# Small enough for make test (tests/test_benchmark_smokes.py): 2 ranks, one MoE layer, short phases.
CPU_SMOKE = dict(preset="small", device="cpu", gpus=2, moe_layers=1, clients=2, max_tokens=4, warmup_seconds=0.5,
                 profile_seconds=2.0, solve_seconds=1.0, measure_tokens="16", measure_iters=2)


# ---------------------------------------------------------------- prepare (CPU machine)


def prepare(args) -> None:
    """The routing trace's layers a model of --moe-layers follows (make-model's default choice: evenly
    spaced), one window of their counts, as a moeplace trace file."""
    from moeplace.readers import load_trace
    from moeplace.trace import Trace, save_trace

    trace = load_trace(args.trace)
    rows = np.linspace(0, trace.num_layers - 1, args.moe_layers).round().astype(int)
    if len(set(rows.tolist())) < len(rows):
        raise SystemExit(f"{args.trace} has {trace.num_layers} layers, fewer than --moe-layers {args.moe_layers}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = Trace(trace.counts_WLE.sum(axis=0, keepdims=True)[:, rows], trace.layers[rows], trace.top_k,
                num_model_layers=trace.num_model_layers, n_group=trace.n_group, topk_group=trace.topk_group,
                metadata={"source": f"{args.trace.name}, layers {trace.layers[rows].tolist()}, windows summed"})
    save_trace(out, args.out / "routing.safetensors")
    print(f"wrote {args.out / 'routing.safetensors'}: layers {trace.layers[rows].tolist()} of {args.trace.name}")


# ---------------------------------------------------------------- run (the driver: no torch.distributed here)


def run(args) -> None:
    from moeplace.client import free_port, running_server

    if args.cpu_smoke:
        for name, value in CPU_SMOKE.items():
            setattr(args, name, value)
    signal.signal(signal.SIGTERM, _terminate)
    if SLOTS % args.gpus:
        raise SystemExit(f"--gpus {args.gpus} does not divide the {SLOTS} slots")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = args.json.resolve() if args.json else None
    trace_path = args.routing_trace.resolve() if args.routing_trace else None
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1", COLUMNS="200")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # G ranks share the cores; tiny tensors gain nothing from threads
    # the server's reshard options come from the environment (runtime/reshard_options.py): kept with the run
    options = {k: v for k, v in sorted(env.items()) if k.startswith("MOEPLACE_RESHARD_")}
    results = Results(json_path, {"date": str(date.today()), "argv": sys.argv, "gpus": args.gpus,
                                  "device": device_name(args.device), "args": jsonable(vars(args)),
                                  "reshard_env": options})
    slots = SLOTS // args.gpus

    # 1. p2p
    start = time.monotonic()
    _torchrun(args, ["p2p", "--json", str(work / "p2p.json")], env, work / "p2p.log")
    results.add("p2p", json.loads((work / "p2p.json").read_text()), time.monotonic() - start)
    # 2. model
    start = time.monotonic()
    model = _model(args, trace_path, work, env)
    results.add("model", json.loads((model / "moeplace_synthetic.json").read_text()), time.monotonic() - start)
    # 3. serve, with the trivial placement
    start_json = _trivial_placement(model, args.gpus, slots, work / "start.json")
    port = free_port()
    serve = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", str(args.gpus), "--model", str(model),
             "--placement", str(start_json), "--device", args.device, "--port", str(port),
             "--max-batch", str(args.clients), "--queue-limit", str(args.clients + 16)]
    start = time.monotonic()
    with running_server(serve, env, work / "serve.log", port, ready_s=args.ready_seconds) as (url, _):
        results.add("serve", {"ready": True, "url": url}, time.monotonic() - start)
        _live_loop(args, url, model, start_json, slots, work, env, results)
    laps = [line for line in (work / "serve.log").read_text().splitlines() if re.match(r"reshard \w+ rank \d+ (laps|pulls)", line)]
    results.add("reshard_laps", {"lines": laps}, 0.0)  # every rank's timeline of each reshard (server log)
    # 10. the MoE layer alone, before / after / uniform
    start = time.monotonic()
    _torchrun(args, ["measure", "--before", str(start_json), "--after", str(work / "solved.json"),
                     "--trace", str(work / "before.safetensors"), "--tokens", args.measure_tokens,
                     "--iters", str(args.measure_iters), "--json", str(work / "moe_layer.json")]
              + (["--small"] if args.preset == "small" else []), env, work / "moe_layer.log")
    results.add("moe_layer", json.loads((work / "moe_layer.json").read_text()), time.monotonic() - start)
    print(summary(results.data), flush=True)
    if results.data["load"]["failed"]:
        raise SystemExit(f"{results.data['load']['failed']} request(s) failed")


def _live_loop(args, url: str, model: Path, start_json: Path, slots: int, work: Path, env: dict, results) -> None:
    """Steps 4-9: load, profile, solve, apply, profile, all against the running server."""
    from moeplace.client import LoadGenerator
    from moeplace.placement import load_placement
    from moeplace.runtime.router_fit import calibration_text

    cli = [sys.executable, "-m", "moeplace.cli"]
    # The kind of text the router biases were fitted on (runtime/router_fit.py), other seeds.
    prompts = [calibration_text(10_000 + i, 96) for i in range(256)]
    # greedy answers of fixed prompts, each alone on the idle server (no load: the same batch shapes),
    # before the load and after both reshards: a moved expert with a wrong byte would change them
    fixed_before = fixed_answers(url, prompts[:FIXED_PROMPTS], args.max_tokens)
    expert_bytes = results.data["model"]["expert_bytes"]
    with LoadGenerator(url, prompts, clients=args.clients, max_tokens=args.max_tokens, timeout=900) as load:
        time.sleep(args.warmup_seconds)
        # 5. before
        start = time.monotonic()
        results.add("before", profile(args, url, cli, work / "before.safetensors", env, load), time.monotonic() - start)
        # 6. solve, keeping what it can of the running layout
        start = time.monotonic()
        _solve(args, cli, work, slots, env, "solved", ["--from", str(start_json)])
        results.add("solve", {"log": (work / "solve.log").read_text()[-4000:]}, time.monotonic() - start)
        # 7. apply, the load going on
        old, new = load_placement(start_json), load_placement(work / "solved.json")
        window = _apply(cli, url, work / "solved.json", old, new, expert_bytes, env, results, "reshard")
        # 8. after
        start = time.monotonic()
        results.add("after", profile(args, url, cli, work / "after.safetensors", env, load), time.monotonic() - start)
        # 8b. a larger live reshard under the same load: the layout solved for the same trace from scratch
        # (any expert may move), applied over the solved one
        _solve(args, cli, work, slots, env, "fresh", [])
        fresh_window = _apply(cli, url, work / "fresh.json", new, load_placement(work / "fresh.json"), expert_bytes,
                              env, results, "reshard_fresh")
    # 8c. the move from scratch undone on the idle server (the load has stopped): the same copies with no
    # serving beside them (under load, the copy calls spent ~70x the benchmark's host time: BENCHMARKS.md)
    _apply(cli, url, work / "solved.json", load_placement(work / "fresh.json"), new, expert_bytes, env, results,
           "reshard_idle")
    fixed_after = fixed_answers(url, prompts[:FIXED_PROMPTS], args.max_tokens)
    same = sum(a == b for a, b in zip(fixed_before, fixed_after))
    # the load's prompts, each asked many times while batches of other requests changed around it
    results.add("answers", {"fixed_prompts": FIXED_PROMPTS, "identical_after_reshards": same,
                            "load_prompts": len(load.texts),
                            "load_prompts_with_several_answers": sum(len(t) > 1 for t in load.texts.values())})
    # 9. every request answered
    results.add("load", load.report(window, "reshard"))
    results.data["reshard_fresh"]["latency_ms_answered_during"] = \
        load.report(fresh_window, "reshard")["latency_ms_answered_during_reshard"]
    results.add("balance", balance(model, old, new, work, results.data["model"]))


def _solve(args, cli: list[str], work: Path, slots: int, env: dict, name: str, extra: list[str]) -> None:
    run_cli(cli + ["solve", str(work / "before.safetensors"), "--gpus", str(args.gpus), "--gpus-per-node",
                str(args.gpus), "--slots-per-gpu", str(slots), "--time-limit", str(args.solve_seconds),
                "-o", str(work / f"{name}.json"), *extra], env, work / f"{name}_solve.log"
         if name != "solved" else work / "solve.log")


def _apply(cli: list[str], url: str, target: Path, old, new, expert_bytes: int, env: dict, results,
           name: str) -> tuple[float, float]:
    """`moeplace apply target` under the load; its numbers into results[name]; the (start, end) window."""
    start = time.monotonic()
    out = run_cli(cli + ["apply", str(target), "--url", url, "--timeout", "900"], env, target.with_suffix(".apply.log"))
    end = time.monotonic()
    results.add(name, reshard_numbers(out, old, new, expert_bytes, end - start, results.data["p2p"]), end - start)
    return start, end


def _model(args, trace_path: Path | None, work: Path, env: dict) -> Path:
    model = work / f"model-{args.preset}-L{args.moe_layers}-s{args.seed}"
    report = model / "moeplace_synthetic.json"
    wanted = str(trace_path) if trace_path else None
    if report.exists() and (wanted is None or json.loads(report.read_text())["routing_trace"] == wanted):
        print(f"reusing {model}", flush=True)
        return model
    shutil.rmtree(model, ignore_errors=True)  # made from another trace, or never finished
    command = [sys.executable, "-m", "moeplace.cli", "make-model", "--preset", args.preset, "--moe-layers",
               str(args.moe_layers), "--device", args.device, "--seed", str(args.seed), "-o", str(model)]
    if trace_path:
        command += ["--routing-trace", str(trace_path)]
    run_cli(command, env, work / "make_model.log")
    return model


def _trivial_placement(model: Path, gpus: int, slots: int, path: Path) -> Path:
    from moeplace.placement import save_placement, trivial_placement
    from moeplace.runtime.config import ModelConfig
    from moeplace.topology import Topology

    config = ModelConfig.load(model)
    placement = trivial_placement(config.n_routed_experts, Topology(gpus, gpus, slots), np.array(config.moe_layers),
                                  config.num_hidden_layers)
    save_placement(placement, path)
    return path


def _torchrun(args, worker: list[str], env: dict, log: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
               str(HERE / "full_loop_workers.py"), *worker] + (["--cpu"] if args.device == "cpu" else [])
    run_cli(command, env, log)


def _terminate(signum, frame) -> None:
    # `timeout` sends SIGTERM: unwind, so the server (its own process session) is stopped too.
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="the routing trace's layers to follow (needs ../shared)")
    p.add_argument("--trace", type=Path, default=SHARED_DSV3)
    p.add_argument("--moe-layers", type=int, required=True)
    p.add_argument("--out", type=Path, default=Path(".dsv3"))
    r = sub.add_parser("run", help="the whole loop (a driver process; starts torchrun and moeplace itself)")
    r.add_argument("--gpus", type=int, default=4, help="ranks, one per GPU")
    r.add_argument("--moe-layers", type=int, default=4)
    r.add_argument("--preset", default="deepseek-v3")
    r.add_argument("--device", default="cuda")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--routing-trace", type=Path, default=None, help="for make-model (default: its own)")
    r.add_argument("--workdir", type=Path, default=Path(".full_loop"), help="model, placements, traces, logs")
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--clients", type=int, default=32, help="concurrent clients (also the server's --max-batch)")
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--warmup-seconds", type=float, default=5.0)
    r.add_argument("--profile-seconds", type=float, default=15.0)
    r.add_argument("--solve-seconds", type=float, default=10.0)
    r.add_argument("--ready-seconds", type=float, default=600.0, help="wait this long for the server to start")
    r.add_argument("--measure-tokens", default="128,4096", help="tokens per rank of the MoE-layer steps")
    r.add_argument("--measure-iters", type=int, default=20)
    r.add_argument("--cpu-smoke", action="store_true", help="small shapes, gloo, short phases: checks the script")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
