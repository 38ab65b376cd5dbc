"""Benchmark one DeepSeek-V3-shaped EP MoE layer (EPMoE) over NCCL: step time and its phases per placement.

Two steps, because the GPU machine has neither ../shared nor OR-Tools:

    # here (CPU, ../shared beside the checkout): placements and per-expert probabilities -> DATA
    python benchmarks/moe_layer.py prepare --out .bench_moe --gpus 2,4 --layers 10,30,50
    # on the GPU machine, one process per GPU (DATA carried along, uncommitted)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      torchrun --nproc-per-node 4 benchmarks/moe_layer.py run --data .bench_moe --iters 30 --json out.json
    # the decode step alone: fixed-capacity dispatch, eager vs CUDA graph vs reading the weights once
    # (no prepared data; moe_layer_decode.py)
    torchrun --nproc-per-node 2 benchmarks/moe_layer.py decode --json decode.json

Layer: hidden 7168, expert intermediate 2048, 256 experts, top-8, FP8 128x128 block-scaled random
weights made on the device in the slot tensors; 288 slots over G GPUs (256 + G*k when G does not
divide 288). Steps: prefill (4096 tokens per rank) and decode (128 per rank); each token picks 8
distinct experts with probability proportional to a real DeepSeek-V3 layer's expert counts
(prefill_in4096 for prefill, decode_in1000out1000 for decode; ../shared/traces/sglang-dsv3-ep-statistics,
licence unstated: only derived probabilities travel, never the files). Placements: trivial (slot p
holds expert p % 256), eplb and greedy (DeepSeek EPLB, moeplace's greedy), cpsat (moeplace's solver),
all planned on the 8 files; against "uniform": every slot equally loaded in expectation (each expert
drawn with probability proportional to its replicas in the trivial layout). The five placements of a
layer are timed in turn within each iteration. Per configuration: the median over iterations of the
step (slowest rank) and of each phase's slowest rank; all_to_all
achieved bandwidth against NCCL's own all_to_all and P2P ring bandwidth measured in the same run.
The shared expert is left out: its cost does not depend on the placement. The timing, NCCL's bandwidth
and the summaries: moe_layer_timing.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`
# full_loop_workers.py imports time_steps, all_gather and summarise from here too
from moe_layer_timing import all_gather, line, nccl_bandwidth, summarise, time_steps  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "sglang-dsv3-ep-statistics"
E, D, FI, TOPK, SLOTS = 256, 7168, 2048, 8, 288
STEPS = {"prefill": (4096, "prefill_in4096"), "decode": (128, "decode_in1000out1000")}
PLACEMENTS = ("uniform", "trivial", "eplb", "greedy", "cpsat")


def slots_per_gpu(gpus: int) -> int:
    return SLOTS // gpus if SLOTS % gpus == 0 else -(-E // gpus) + 1


# ---------------------------------------------------------------- prepare (CPU machine)


def prepare(args) -> None:
    from moeplace.placement import save_placement, trivial_placement
    from moeplace.placer.solve import Method, SolveOptions, solve
    from moeplace.readers import load_trace
    from moeplace.topology import Topology

    files = sorted(args.traces.glob("*.json"))
    if not files:
        raise SystemExit(f"no SGLang statistics in {args.traces}")
    traces = [load_trace(f) for f in files]
    layers = [int(l) for l in args.layers.split(",")]
    rows = [int(np.flatnonzero(traces[0].layers == l)[0]) for l in layers]
    args.out.mkdir(parents=True, exist_ok=True)
    probs = {}
    for f, t in zip(files, traces):
        counts_LE = t.counts_WLE.sum(axis=0)[rows].astype(np.float64)
        probs[f.stem] = (counts_LE / counts_LE.sum(axis=1, keepdims=True)).round(8).tolist()
    (args.out / "probs.json").write_text(json.dumps({"layers": layers, "rows": rows, "experts": E, "probs": probs}))
    for gpus in (int(g) for g in args.gpus.split(",")):
        topology = Topology(gpus, gpus, slots_per_gpu(gpus))
        save_placement(trivial_placement(E, topology, traces[0].layers, traces[0].num_model_layers),
                       args.out / f"G{gpus}_trivial.json")
        for method in (Method.eplb, Method.greedy, Method.cpsat):
            start = time.monotonic()
            result = solve(traces, topology, SolveOptions(method=method, time_limit=args.time_limit))
            save_placement(result.placement, args.out / f"G{gpus}_{method.value}.json")
            print(f"G{gpus} {method.value}: {time.monotonic() - start:.1f} s", flush=True)


# ---------------------------------------------------------------- run (GPU machine, under torchrun)


def deepseek_config(hidden: int, inter: int):
    from moeplace.runtime.config import ModelConfig

    return ModelConfig(
        vocab_size=129280, hidden_size=hidden, intermediate_size=18432, moe_intermediate_size=inter,
        num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=TOPK, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096,
        source="deepseek-v3 shapes")


def random_slots(S: int, hidden: int, inter: int, device, seed: int):
    """Block-scaled FP8 weights of S experts, random (never zeros), made slot by slot on the device."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    fp8 = torch.float8_e4m3fn

    def weight(N, K):
        q = torch.empty(S, N, K, dtype=fp8, device=device)
        for s in range(S):
            q[s] = (torch.randn(N, K, device=device, generator=gen, dtype=torch.bfloat16) * 16).to(fp8)
        scale = torch.rand(S, N // 128, K // 128, device=device, generator=gen) * 0.5 + 0.75
        return q, scale / (16 * K ** 0.5)

    return (*weight(2 * inter, hidden), *weight(hidden, inter))


def sample_routing(p_E, T: int, gen, device):
    """[T, 8] distinct experts per token, drawn with probability p_E; weights renormalised x 2.5."""
    import torch

    ids = torch.multinomial(p_E.expand(T, E), TOPK, replacement=False, generator=gen)
    w = torch.rand(T, TOPK, device=device, generator=gen) + 0.1
    return ids, (2.5 * w / w.sum(dim=1, keepdim=True)).float()


def run(args) -> None:
    import torch
    import torch.distributed as dist

    from moeplace.placement import load_placement
    from moeplace.runtime.comm import Comm
    from moeplace.runtime.moe import EPMoE

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu_smoke:  # the script's own check on a machine without GPUs: gloo, small shapes, no bandwidth
        device, name, bandwidth = torch.device("cpu"), "cpu", {}
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        name, bandwidth = torch.cuda.get_device_name(device), nccl_bandwidth(device, world, rank)
    comm = Comm.of(dist.group.WORLD)
    config = deepseek_config(args.hidden, args.inter)
    hf_config = config.to_hf()
    meta = json.loads((args.data / "probs.json").read_text())
    weights = random_slots(slots_per_gpu(world), args.hidden, args.inter, device, seed=rank)
    if rank == 0:
        print(f"# {date.today()} {name} x{world}, torch {torch.__version__}; "
              f"NCCL GB/s per GPU: " + ", ".join(f"{k} {v:.0f}" for k, v in bandwidth.items()), flush=True)
    results = []
    layers = [int(l) for l in args.layers.split(",")] if args.layers else meta["layers"]
    for layer in layers:
        j, row = meta["layers"].index(layer), int(meta["rows"][meta["layers"].index(layer)])
        for step, (T, workload) in STEPS.items():
            if step not in args.steps:
                continue
            T = T // args.shrink
            gen = torch.Generator(device=device).manual_seed(1000 * layer + rank)
            x = torch.randn(T, args.hidden, device=device, generator=gen).to(torch.bfloat16)
            steps = []
            for method in PLACEMENTS:
                placement = load_placement(args.data / f"G{world}_{'trivial' if method == 'uniform' else method}.json")
                if method == "uniform":  # every slot equally loaded in expectation
                    p_E = torch.as_tensor(placement.replica_count_LE[row], dtype=torch.float32, device=device)
                else:
                    p_E = torch.as_tensor(meta["probs"][workload][j], dtype=torch.float32, device=device)
                moe = EPMoE(config, hf_config, layer, row, placement, comm, device, torch.bfloat16)
                for buf, value in zip(("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf"), weights):
                    getattr(moe, buf).copy_(value)
                steps.append((moe, x, *sample_routing(p_E, T, gen, device)))
            for method, (moe, *_), (per_rank, traffic) in zip(PLACEMENTS, steps,
                                                              time_steps(steps, args.iters, args.warmup)):
                load = moe.slot_tokens_S.sum().reshape(1).double()
                wire = torch.tensor(traffic.off_rank_bytes(rank), dtype=torch.float64, device=device)
                t_RIX, loads, wires = (all_gather(t, world) for t in (per_rank, load, wire))
                if rank == 0:
                    results.append(summarise(layer, step, method, t_RIX, [int(l) for l in loads[:, 0]], wires))
                    if method == "uniform":  # first in PLACEMENTS
                        uniform_ms = results[-1]["step_ms"]
                    results[-1]["vs_uniform"] = results[-1]["step_ms"] / uniform_ms
                    print(line(results[-1]), flush=True)
            del steps, moe
    if rank == 0 and args.json:
        args.json.write_text(json.dumps({"date": str(date.today()), "device": name,
                                         "gpus": world, "torch": torch.__version__, "nccl_gbs": bandwidth,
                                         "results": results}, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="placements and probabilities (needs ../shared and OR-Tools)")
    p.add_argument("--traces", type=Path, default=SHARED)
    p.add_argument("--out", type=Path, default=Path(".bench_moe"))
    p.add_argument("--gpus", default="2,4")
    p.add_argument("--layers", default="10,30,50")
    p.add_argument("--time-limit", type=float, default=20.0)
    r = sub.add_parser("run", help="the benchmark, one process per GPU under torchrun")
    r.add_argument("--data", type=Path, default=Path(".bench_moe"))
    r.add_argument("--layers", default=None, help="subset of the prepared layers")
    r.add_argument("--steps", default="prefill,decode")
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--hidden", type=int, default=D)
    r.add_argument("--inter", type=int, default=FI)
    r.add_argument("--shrink", type=int, default=1, help="divide the tokens per rank (quick checks)")
    r.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU (use small --hidden/--inter)")
    d = sub.add_parser("decode", help="decode step eager vs CUDA graph vs weights read (moe_layer_decode.py)")
    d.add_argument("--tokens", type=int, default=STEPS["decode"][0], help="decode tokens per rank")
    d.add_argument("--iters", type=int, default=30)
    d.add_argument("--warmup", type=int, default=5)
    d.add_argument("--copy-mib", type=int, default=4096, help="buffer of the device-copy bandwidth")
    d.add_argument("--json", type=Path, default=None)
    d.add_argument("--hidden", type=int, default=D)
    d.add_argument("--inter", type=int, default=FI)
    d.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU (use small --hidden/--inter)")
    args = parser.parse_args(argv)
    if args.command == "decode":
        from moe_layer_decode import bench

        bench(args)
    else:
        prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
