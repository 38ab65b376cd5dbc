"""The torchrun workers of benchmarks/full_loop.py (its driver starts them; one process per rank):

    python -m torch.distributed.run --standalone --nproc-per-node=G benchmarks/full_loop_workers.py \\
        p2p --json p2p.json [--cpu]
    ... benchmarks/full_loop_workers.py measure --before start.json --after solved.json \\
        --trace before.safetensors --tokens 128,4096 --json moe_layer.json [--cpu] [--small]

p2p: step 1 of full_loop.py, the NCCL (gloo with --cpu) ring bandwidth, GB/s per GPU.
measure: step 10, the MoE layer alone under the uniform, before and after placements.
Rank 0 writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def _init(cpu: bool):
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if cpu:
        dist.init_process_group("gloo")
        return rank, dist.get_world_size(), torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return rank, dist.get_world_size(), device


def p2p(args) -> None:
    import torch.distributed as dist

    from reshard import copy_engine_p2p, nccl_p2p

    rank, world, device = _init(args.cpu)
    nbytes = (1 << 22) if args.cpu else (1 << 30)
    out = {"gbps_per_gpu": nccl_p2p(dist.group.WORLD, device, nbytes), "bytes": nbytes, "ranks": world}
    if not args.cpu:  # peer copies on the copy engines (the reshard's MOEPLACE_RESHARD_COPY_ENGINE=1)
        out["copy_engine_gbps_per_gpu"] = copy_engine_p2p(device, nbytes)
    if rank == 0:
        args.json.write_text(json.dumps(out) + "\n")
    dist.destroy_process_group()


def measure(args) -> None:
    import torch
    import torch.distributed as dist

    from moe_layer import all_gather, deepseek_config, random_slots, sample_routing, summarise, time_steps
    from moeplace.placement import load_placement
    from moeplace.readers import load_trace
    from moeplace.runtime.comm import Comm
    from moeplace.runtime.moe import EPMoE

    rank, world, device = _init(args.cpu)
    hidden, inter = (256, 128) if args.small else (7168, 2048)
    config = deepseek_config(hidden, inter)
    hf_config, comm = config.to_hf(), Comm.of(dist.group.WORLD)
    before, after = load_placement(args.before), load_placement(args.after)
    counts_LE = load_trace(args.trace).counts_WLE.sum(axis=0)
    weights = random_slots(before.topology.slots_per_gpu, hidden, inter, device, seed=rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for row, layer in enumerate(before.layers.tolist()):
        for T in (int(t) for t in args.tokens.split(",")):
            gen = torch.Generator(device=device).manual_seed(1000 * layer + rank)
            x = torch.randn(T, hidden, device=device, generator=gen).to(dtype)
            live_E = torch.as_tensor(counts_LE[row], dtype=torch.float32, device=device)
            cases = {"uniform": (before, torch.as_tensor(before.replica_count_LE[row], dtype=torch.float32, device=device)),
                     "before": (before, live_E), "after": (after, live_E)}
            steps = []
            for placement, p_E in cases.values():
                moe = EPMoE(config, hf_config, layer, row, placement, comm, device, dtype)
                for buf, value in zip(("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf"), weights):
                    getattr(moe, buf).copy_(value)
                steps.append((moe, x, *sample_routing(p_E, T, gen, device)))
            timed = {}
            for name, (moe, *_), (per_rank, traffic) in zip(cases, steps, time_steps(steps, args.iters, args.warmup)):
                load = moe.slot_tokens_S.sum().reshape(1).double()
                wire = torch.tensor(traffic.off_rank_bytes(rank), dtype=torch.float64, device=device)
                t_RIX, loads, wires = (all_gather(t, world) for t in (per_rank, load, wire))
                timed[name] = summarise(layer, "decode" if T <= 512 else "prefill", name, t_RIX,
                                        [int(v) for v in loads[:, 0]], wires)
                timed[name]["tokens_per_rank"] = T
                timed[name]["experts_ms_per_gpu"] = np.median(t_RIX[:, :, 2], axis=1).round(4).tolist()  # PHASES[2]
            for out in timed.values():
                out["vs_uniform"] = out["step_ms"] / timed["uniform"]["step_ms"]
            results += timed.values() if rank == 0 else []
            del steps, moe
    if rank == 0:
        args.json.write_text(json.dumps({"device": str(device), "ranks": world, "iters": args.iters,
                                         "routing": f"drawn from {args.trace}", "results": results}, indent=1) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("p2p", "NCCL P2P ring bandwidth"), ("measure", "MoE layer timing")):
        w = sub.add_parser(name, help=help_)
        w.add_argument("--json", type=Path, required=True)
        w.add_argument("--cpu", action="store_true")
    m = sub.choices["measure"]
    m.add_argument("--before", type=Path, required=True)
    m.add_argument("--after", type=Path, required=True)
    m.add_argument("--trace", type=Path, required=True)
    m.add_argument("--tokens", default="128,4096")
    m.add_argument("--iters", type=int, default=20)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    {"p2p": p2p, "measure": measure}[args.command](args)


if __name__ == "__main__":
    main()
