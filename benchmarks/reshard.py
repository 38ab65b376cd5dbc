"""Live reshard benchmark: DeepSeek-size FP8 experts (44 MB each) moved GPU to GPU by moeplace's
`Resharder` (the code `moeplace serve` runs) while serving-like steps keep running; compared with the
peer bandwidth measured in the same run (NCCL P2P, and copy-engine peer copies).

    torchrun --nproc-per-node G benchmarks/reshard.py [--layers L] [--rates GBPS,...] [--json out.json]
    torchrun --nproc-per-node 2 benchmarks/reshard.py --cpu-smoke      # gloo, tiny experts, seconds

Every rank holds `slots_per_gpu` slots of L EPMoE layers (gate/up [2*2048, 7168], down [7168, 2048]
float8_e4m3fn with 128x128 float32 scales; each expert's bytes drawn from its (layer, expert) seed,
so replicas agree). Placements: the trivial layout and one solved from real DeepSeek-V3 statistics
(../shared/traces, else the package's example trace scaled to 256 experts). The serving thread runs
steps (per layer a decode-sized GEMM and an all-reduce, standing in for the MoE layer's compute and
collective) and applies the reshard's actions between steps, as the engine does. Per rate limit
(0 = unlimited) two reshards, there and back: reshard seconds, busiest GPU's received bytes / seconds
vs the best peer bandwidth, experts moved vs the plan's minimum, step p50/p99 during vs steady.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import Placement, load_placement, trivial_placement
from moeplace.topology import Topology

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`
from reshard_links import copy_engine_experts, copy_engine_p2p, nccl_p2p, sync_stream  # noqa: E402

E, TOPK = 256, 8
# Two layers in flight at 2 GPUs x 144 slots need ~2 x 6 GB of staging per GPU (serve's default: 8 GiB).
STAGING = 32 << 30


def placements(world: int, layers: int, cpu_smoke: bool) -> tuple[Placement, Placement]:
    """(trivial, greedy-solved for the example trace) over `world` GPUs, 256 experts + 8 redundant
    slots per GPU (64 experts for the smoke): where no --old/--new are given."""
    from moeplace.placer.solve import Method, SolveOptions, solve
    from moeplace.readers import load_trace
    from moeplace.resources import EXAMPLE_TRACE
    from moeplace.trace import Trace

    experts = 64 if cpu_smoke else E
    slots = (experts + (8 if cpu_smoke else 32)) // world
    topology = Topology(world, world, slots)
    counts = load_trace(EXAMPLE_TRACE).counts_WLE.astype(np.int64)  # [W, 3, 64]
    counts_WLE = np.tile(counts, (1, -(-layers // counts.shape[1]), experts // counts.shape[2]))[:, :layers]
    ids = np.arange(layers)
    trace = Trace(counts_WLE, ids, TOPK, num_model_layers=layers, n_group=8, topk_group=4, source="example")
    old = trivial_placement(experts, topology, ids, layers)
    new = solve([trace], topology, SolveOptions(method=Method.greedy, workers=1)).placement
    return old, new


def build_model(placement: Placement, rank: int, hidden: int, inter: int, device):
    """L EPMoE layers holding this rank's slots, each expert's bytes from its (layer, expert) seed."""
    from types import SimpleNamespace

    from moeplace.runtime.comm import Comm
    from moeplace.runtime.config import ModelConfig
    from moeplace.runtime.moe import EPMoE

    config = ModelConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=4 * inter, moe_intermediate_size=inter,
        num_hidden_layers=placement.num_layers, first_k_dense_replace=0, n_routed_experts=placement.num_experts,
        n_shared_experts=1, num_experts_per_tok=TOPK, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=256, source="reshard benchmark")
    hf_config, comm = config.to_hf(), Comm.of(dist.group.WORLD)
    layers = []
    for row in range(placement.num_layers):
        moe = EPMoE(config, hf_config, row, row, placement, comm, device, torch.bfloat16)
        for s, expert in enumerate(moe.slot_experts_S.tolist()):
            gen = torch.Generator(device=device).manual_seed(row * placement.num_experts + expert)
            for t in moe.read_slot(s).wire():
                t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device, generator=gen))
        layers.append(moe)
    return SimpleNamespace(placement=placement, moe_layers=layers)


@dataclass(frozen=True)
class StepWork:
    """What one serving step computes, `layers` times: x_MK @ work_KN (a decode-sized GEMM standing in for
    an MoE layer's compute) and an all-reduce (its collective). `layers` sets the step's length: the
    resharded layers only, or a whole model's depth (DeepSeek-V3: 58 MoE layers) for steps of real length."""

    work_KN: torch.Tensor
    x_MK: torch.Tensor
    layers: int


def step(model, control, resharder, work: StepWork, job_id=None) -> tuple[float, bool, bool]:
    """One serving step: apply due actions (rank 0 decides, and tells whether job `job_id` has ended),
    then the step's work. (seconds, ended, whether a layer swap ran in it)."""
    from moeplace.runtime.control import SwapLayer

    start = time.perf_counter()
    ended = job_id is not None and resharder.jobs.get(job_id).state.final if dist.get_rank() == 0 else None
    box = [(resharder.due_actions(), ended) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control)
    for action in box[0][0]:
        resharder.apply(action)
    for _ in range(work.layers):
        y = work.x_MK @ work.work_KN
        dist.all_reduce(y[:1])
    sync_stream(work.x_MK.device)
    swapped = any(isinstance(action, SwapLayer) for action in box[0][0])
    return time.perf_counter() - start, bool(box[0][1]), swapped


def reshard(model, control, resharder, target, work: StepWork) -> tuple[object, list[float], list[bool]]:
    """Submit `target` (rank 0) and keep stepping until the job ends: (final JobStatus on rank 0, step
    seconds, whether each step swapped a layer)."""
    job = resharder.submit(target) if dist.get_rank() == 0 else None
    during, swaps, ended = [], [], False
    while not ended:
        seconds, ended, swapped = step(model, control, resharder, work, job.id if job else None)
        during.append(seconds)
        swaps.append(swapped)
    return (resharder.jobs.get(job.id) if job else None), during, swaps


def received_by_busiest(old: Placement, new: Placement) -> int:
    """Experts the busiest GPU receives over a link in the plan old -> new."""
    from moeplace.runtime.reshard_plan import NETWORK_LINKS, plan_reshard

    plan = plan_reshard(old, new)
    x = np.isin(plan.kind_X, NETWORK_LINKS)
    topo = plan.topology
    return int(np.bincount(plan.dst_slot_X[x] // topo.slots_per_gpu, minlength=topo.num_gpus).max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, default=None, help="placement to start from (default: trivial)")
    p.add_argument("--new", type=Path, default=None,
                   help="placement to reshard to (default: greedy, for the example trace)")
    p.add_argument("--layers", type=int, default=4, help="the first L layers of the placements")
    p.add_argument("--rates", default="0,100,50,25,12", help="rate limits to run, GB/s per GPU (0 = unlimited)")
    p.add_argument("--steady-steps", type=int, default=50)
    p.add_argument("--step-layers", type=int, default=0,
                   help="layers of work per serving step (0: the resharded layers; 58: DeepSeek-V3's depth)")
    p.add_argument("--repeats", type=int, default=1,
                   help="reshard pairs (there and back) per rate: the frontier pools their steps, so p99 rests on "
                        "more than a handful of steps")
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, tiny experts: checks the script")
    p.add_argument("--copy-engine", action="store_true", help="peer copies through CUDA IPC instead of NCCL")
    p.add_argument("--copy-streams", type=int, default=1, help="streams the peer copies go round-robin over")
    p.add_argument("--copy-batch", type=int, choices=(0, 1), default=1,
                   help="1: a stream's copies of a pull in one driver call (cuMemcpyBatchAsync); 0: one call each")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from moeplace.runtime.reshard import Resharder
    from moeplace.runtime.reshard_options import ReshardOptions

    cuda = not args.cpu_smoke
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo")  # steps' broadcasts, and the reshard's agreements
    reshard_group = dist.new_group(backend="nccl" if cuda else "gloo")
    # The reshard's agreements on a gloo group of their own (as serve does): never interleaved with
    # the steps' broadcasts on `control`, which the serving thread sends meanwhile.
    reshard_control = dist.new_group(backend="gloo") if cuda else None
    hidden, inter = (7168, 2048) if cuda else (256, 128)
    if args.old and args.new:
        old, new = (_first_rows(load_placement(path), args.layers) for path in (args.old, args.new))
    else:
        old, new = placements(world, args.layers, args.cpu_smoke)
    model = build_model(old, rank, hidden, inter, device)
    peer = {"nccl_p2p": nccl_p2p(reshard_group, device, (1 << 30) if cuda else (1 << 20))}
    if cuda and torch.cuda.device_count() > 1:
        peer["copy_engine"] = copy_engine_p2p(device, 1 << 30)
    best = max(peer.values())
    patterns = copy_engine_experts(device, model.moe_layers[0].read_slot(0)) \
        if cuda and torch.cuda.device_count() > 1 else {}
    dtype = torch.bfloat16 if cuda else torch.float32
    work = StepWork(torch.randn(hidden, inter, device=device, dtype=dtype),
                    torch.randn(128 * 8 // world, hidden, device=device, dtype=dtype),
                    args.step_layers or len(model.moe_layers))
    results, steady, frontier = [], None, []
    for rate in [float(r) for r in args.rates.split(",")]:
        options = ReshardOptions.from_env({}, timeout_s=600.0, rate_bytes_per_s=rate * 1e9,
                                          copy_engine=args.copy_engine and cuda, staging_bytes=STAGING,
                                          copy_streams=args.copy_streams, copy_batch=bool(args.copy_batch))
        resharder = Resharder(model, reshard_group, rank, control=reshard_control, options=options)
        resharder.connect()
        steady = [step(model, control, resharder, work)[0] for _ in range(args.steady_steps)]
        for repeat in range(args.repeats):
            for source, target, label in ((old, new, "trivial->solved"), (new, old, "solved->trivial")):
                job, during, swaps = reshard(model, control, resharder, target, work)
                timelines = [None] * world  # every rank's laps: where each layer's time went
                dist.all_gather_object(timelines, [asdict(lap) for lap in resharder.timeline], group=control)
                if rank == 0:
                    results.append(_result(job, rate, source, target, resharder.expert_bytes, best, steady,
                                           during, swaps))
                    results[-1].update(direction=label, repeat=repeat, timelines=timelines, during_s=during,
                                       swaps=swaps)
                    print(_line(results[-1]), flush=True)
        if rank == 0:
            frontier.append(_pooled([r for r in results if r["rate_gbps"] == rate], steady))
            print(_pooled_line(frontier[-1]), flush=True)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        out = {"date": str(date.today()), "device": name, "gpus": world, "layers": args.layers,
               "transport": "copy engine (CUDA IPC)" if args.copy_engine and cuda else "nccl" if cuda else "gloo",
               "expert_bytes": resharder.expert_bytes, "peer_gbps_per_gpu": peer, "reshards": results,
               "frontier": frontier, "repeats": args.repeats, "copy_engine_expert_pulls_gbps": patterns,
               "step_layers": work.layers,
               "copy_driver": bool(resharder.mover.peer_copies and resharder.mover.peer_copies.driver),
               "copy_batched": bool(resharder.mover.peer_copies and resharder.mover.peer_copies.batch)}
        print(f"# {date.today()} {name} x{world}; peer GB/s per GPU: "
              + ", ".join(f"{k} {v:.0f}" for k, v in peer.items()) + "; expert pulls (copy engine) GB/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in patterns.items()), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


def _first_rows(placement: Placement, layers: int) -> Placement:
    rows = slice(0, layers)
    return Placement(placement.phy2log_LP[rows], placement.num_experts, placement.topology, placement.layers[rows],
                     placement.num_model_layers, None, placement.provenance, placement.source)


def _result(job, rate, source, target, expert_bytes, best, steady, during, swaps) -> dict:
    from moeplace.placer.evaluate import moves

    busiest = received_by_busiest(source, target) * expert_bytes
    gbps = busiest / job.seconds / 1e9 if job.seconds > 0 else 0.0
    pct = _ms_percentile
    return {"rate_gbps": rate, "state": job.state.value,
            "error": job.error, "seconds": job.seconds, "experts_moved": job.experts_moved,
            "plan_minimum": int(moves(source, target).experts), "busiest_gpu_received_bytes": busiest,
            "busiest_gbps": gbps, "of_best_peer": gbps / best, "steps_during": len(during),
            "steady_p50_ms": pct(steady, 50), "steady_p99_ms": pct(steady, 99),
            "during_p50_ms": pct(during, 50), "during_p99_ms": pct(during, 99), "during_max_ms": pct(during, 100),
            "swap_steps": int(sum(swaps)), "swap_step_max_ms": pct([t for t, s in zip(during, swaps) if s], 100),
            "no_swap_p99_ms": pct([t for t, s in zip(during, swaps) if not s], 99),
            "phase_seconds": job.to_json()["phase_seconds"], "rank_phase_seconds": job.to_json()["rank_phase_seconds"]}


def _ms_percentile(seconds: list[float], q: float) -> float:
    """The q-th percentile of step times, in ms (0 for no steps)."""
    return float(np.percentile(np.array(seconds or [0.0]) * 1e3, q))


def _pooled(jobs: list[dict], steady: list[float]) -> dict:
    """One rate's row of the frontier: every job's steps during the reshard pooled; bandwidth as the median job's."""
    during = [t for r in jobs for t in r["during_s"]]
    plain = [t for r in jobs for t, swapped in zip(r["during_s"], r["swaps"]) if not swapped]
    pct = _ms_percentile
    return {"rate_gbps": jobs[0]["rate_gbps"], "jobs": len(jobs), "steps_during": len(during),
            "busiest_gbps_median": float(np.median([r["busiest_gbps"] for r in jobs])),
            "of_best_peer_median": float(np.median([r["of_best_peer"] for r in jobs])),
            "seconds_median": float(np.median([r["seconds"] for r in jobs])),
            "steady_p50_ms": pct(steady, 50), "steady_p99_ms": pct(steady, 99),
            "during_p50_ms": pct(during, 50), "during_p99_ms": pct(during, 99), "no_swap_p99_ms": pct(plain, 99),
            "p99_ratio": pct(during, 99) / pct(steady, 99), "p50_ratio": pct(during, 50) / pct(steady, 50)}


def _pooled_line(f: dict) -> str:
    return (f"frontier: rate {f['rate_gbps']:>5g} GB/s | {f['jobs']} jobs, median {f['seconds_median']:.3f} s, "
            f"{f['busiest_gbps_median']:.1f} GB/s = {100 * f['of_best_peer_median']:.0f}% of best peer | "
            f"{f['steps_during']} steps during: p50 {f['during_p50_ms']:.2f} ms (x{f['p50_ratio']:.2f}), "
            f"p99 {f['during_p99_ms']:.2f} ms (x{f['p99_ratio']:.2f}), without swaps {f['no_swap_p99_ms']:.2f} | "
            f"steady p50 {f['steady_p50_ms']:.2f} / p99 {f['steady_p99_ms']:.2f} ms")


def _line(r: dict) -> str:
    return (f"rate {r['rate_gbps']:>5g} GB/s | {r['direction']} {r['state']} {r['seconds']:.3f} s | "
            f"moved {r['experts_moved']} (min {r['plan_minimum']}) | busiest GPU {r['busiest_gbps']:.2f} GB/s "
            f"= {100 * r['of_best_peer']:.0f}% "
            f"of best peer | step p50 {r['during_p50_ms']:.2f} / p99 {r['during_p99_ms']:.2f} ms "
            f"(steady {r['steady_p50_ms']:.2f} / {r['steady_p99_ms']:.2f}; "
            f"x{r['during_p99_ms'] / r['steady_p99_ms']:.2f}) | without swaps p99 {r['no_swap_p99_ms']:.2f} ms, "
            f"{r['swap_steps']} swap steps max {r['swap_step_max_ms']:.2f} ms | {r['steps_during']} steps | "
            + " | ".join(" ".join(f"{k} {v:.3f}" for k, v in phases.items()) for phases in r["rank_phase_seconds"]))


if __name__ == "__main__":
    main()
