"""Live reshard benchmark: DeepSeek-size FP8 experts (44 MB each) moved GPU to GPU while decode-like
steps keep running, compared with the NCCL P2P bandwidth measured in the same run.

    torchrun --nproc-per-node G benchmarks/reshard.py --old OLD.json --new NEW.json [--layers L] [--json out.json]

Every rank holds `slots_per_gpu` slots of L MoE layers (real slot tensors: gate/up [2048*2, 7168] and
down [7168, 2048] float8_e4m3fn with 128x128 float32 scales) and runs moeplace's `Resharder` — the same
code `moeplace serve` runs — from OLD to NEW. Meanwhile the serving thread runs steps (per layer a
decode-sized expert GEMM on this rank plus an all-reduce, standing in for the MoE layer's compute and
collective) and applies layer swaps between steps exactly as the engine does (rank 0 broadcasts them).
Reported: steady-state and during-reshard step times (p50 / p99 / max), reshard wall time, experts and
bytes moved, effective transfer bandwidth per GPU vs NCCL P2P measured on the same GPUs.
CPU (gloo) works too with --tiny, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import load_placement
from moeplace.runtime.reshard import Resharder
from moeplace.runtime.routing import SlotTable

FP8 = torch.float8_e4m3fn


def make_layer(placement, row: int, rank: int, hidden: int, inter: int, device) -> SimpleNamespace:
    """One MoE layer's slots on this rank, filled with random FP8 weights and scales."""
    S = placement.topology.slots_per_gpu
    fp8 = lambda *shape: torch.randn(*shape, device=device).clamp(-448, 448).to(FP8)  # noqa: E731
    blocks = lambda a, b: (S, -(-a // 128), -(-b // 128))  # noqa: E731
    experts = torch.tensor(placement.phy2log_LP[row, rank * S: (rank + 1) * S], device=device)
    return SimpleNamespace(
        w13_SFD=fp8(S, 2 * inter, hidden), w13_sinv_Sfd=torch.rand(blocks(2 * inter, hidden), device=device),
        w2_SDF=fp8(S, hidden, inter), w2_sinv_Sdf=torch.rand(blocks(hidden, inter), device=device),
        slot_experts_S=experts, table=SlotTable.from_placement(placement, row, device),
    )


def p2p_bandwidth(group, device, nbytes: int) -> float:
    """GB/s per GPU: every rank sends `nbytes` to the next and receives from the previous, at once."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    ops = lambda: [dist.P2POp(dist.isend, send, (rank + 1) % world, group),  # noqa: E731
                   dist.P2POp(dist.irecv, recv, (rank - 1) % world, group)]
    for w in dist.batch_isend_irecv(ops()):
        w.wait()
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        for w in dist.batch_isend_irecv(ops()):
            w.wait()
    _sync(device)
    return 5 * nbytes / (time.perf_counter() - start) / 1e9


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, control, resharder, work_KN, x_MK, world_group) -> float:
    """One serving step: apply due swaps (rank 0 decides), then per layer a GEMM and an all-reduce."""
    start = time.perf_counter()
    box = [resharder.due_actions() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control)
    for action in box[0]:
        resharder.apply(action)
    for _ in model.moe_layers:
        y = x_MK @ work_KN
        dist.all_reduce(y[:1], group=world_group)
    _sync(x_MK.device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steady-steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="small experts, CPU/gloo check")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")
    reshard_group = dist.new_group(backend="nccl" if cuda else "gloo")
    hidden, inter = (256, 128) if args.tiny else (7168, 2048)
    old, new = load_placement(args.old), load_placement(args.new)
    rows = list(range(min(args.layers, old.num_layers)))
    old, new = (_rows(pl, rows) for pl in (old, new))
    model = SimpleNamespace(placement=old, moe_layers=[make_layer(old, r, rank, hidden, inter, device) for r in rows])
    resharder = Resharder(model, reshard_group, rank, timeout_s=600)
    bandwidth = p2p_bandwidth(reshard_group, device, (1 << 30) if cuda else (1 << 22))
    dtype = torch.bfloat16 if cuda else torch.float32
    work_KN = torch.randn(hidden, inter, device=device, dtype=dtype)
    x_MK = torch.randn(128 * 8 // dist.get_world_size(), hidden, device=device, dtype=dtype)
    steady = [step(model, control, resharder, work_KN, x_MK, dist.group.WORLD) for _ in range(args.steady_steps)]
    results = []
    # Twice: OLD -> NEW, then NEW -> OLD. The first also pays for NCCL's lazy set-up of the
    # point-to-point connections between rank pairs the warm-up did not use.
    for target, source in ((new, old), (old, new)):
        job = resharder.submit(target) if rank == 0 else None
        during = []
        while True:
            during.append(step(model, control, resharder, work_KN, x_MK, dist.group.WORLD))
            flag = torch.tensor([1 if rank == 0 and job.state in ("done", "rolled_back", "failed") else 0], device=device)
            dist.broadcast(flag, src=0)
            if int(flag):
                break
        if rank == 0:
            moved_per_gpu = np.bincount(_receivers(resharder, source, target), minlength=dist.get_world_size()).max()
            results.append({
                "from": source.source, "to": target.source, "state": job.state, "error": job.error,
                "experts_moved": job.experts_moved, "bytes_moved": job.bytes_moved, "reshard_seconds": job.seconds,
                "busiest_gpu_received_bytes": int(moved_per_gpu * resharder.expert_bytes),
                "effective_gbps_per_gpu": moved_per_gpu * resharder.expert_bytes / job.seconds / 1e9,
                "during_ms": _percentiles(during), "steps_during": len(during),
            })
    if rank == 0:
        out = {
            "gpus": dist.get_world_size(), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "layers": len(rows), "expert_bytes": resharder.expert_bytes, "nccl_p2p_gbps_per_gpu": bandwidth,
            "steady_ms": _percentiles(steady), "reshards": results,
        }
        print(json.dumps(out, indent=1), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()


def _receivers(resharder, old, new) -> np.ndarray:
    from moeplace.runtime.reshard_plan import NETWORK_LINKS, plan_reshard

    plan = plan_reshard(old, new)
    x = np.isin(plan.kind_X, NETWORK_LINKS)
    return plan.dst_slot_X[x] // plan.topology.slots_per_gpu


def _percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def _rows(placement, rows):
    from moeplace.placement import Placement

    return Placement(placement.phy2log_LP[rows], placement.num_experts, placement.topology, placement.layers[rows],
                     placement.num_model_layers, None, placement.provenance, placement.source)


if __name__ == "__main__":
    main()
