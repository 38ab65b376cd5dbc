"""`moe_layer.py decode`: the decode MoE layer step at DeepSeek-V3 shapes, eager and in CUDA graphs, against
the time to read the GPU's expert weights once (one process per GPU under torchrun; --cpu-smoke: gloo).

Per rank: one EPMoE layer (288 slots over G GPUs, the trivial placement, so 32 experts have a replica),
random FP8 slot weights, `--tokens` tokens (128) routed with probability proportional to each expert's
replicas (every slot equally loaded in expectation). Timed (median over iterations of the slowest rank,
each iteration started together on all ranks from an idle stream):
- weights_read: this GPU's slot bytes ÷ the device-copy bandwidth measured here (bytes read + written);
- route: `assign_slots` alone, eager and as a graph;
- routed: the routed experts from given top-k ids (as `run` times them): variable-size path
  (`step_with_ids`, eager), fixed-capacity path (`decode_step`) eager and as a graph;
- layer: the whole MoE layer (gate, routed experts, shared expert: `forward_decode`), eager and graph;
- swap: a reshard's in-place layout swap (`use_layout`), and capturing a bucket again (the alternative).
Checks printed with the numbers: graph replay == eager (bits), decode vs the variable path (relative
error), and that one eager `forward_decode` runs under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import date

import numpy as np
import torch
import torch.distributed as dist

from moeplace.placement import trivial_placement
from moeplace.runtime.comm import Comm
from moeplace.runtime.graphs import DecodeGraphs
from moeplace.runtime.moe import EPMoE
from moeplace.runtime.routing import assign_slots
from moeplace.topology import Topology

SLOT_TENSORS = ("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf")


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median ms of fn over iterations, the slowest rank's; every iteration starts on all ranks together."""
    flag = torch.zeros(1, device=device)
    times = []
    for i in range(warmup + iters):
        dist.all_reduce(flag)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            start = time.perf_counter()
            fn()
            ms = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(ms)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-copy bandwidth in GB/s, bytes read plus bytes written (median of 20 copies)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 20, 3, device)
    return 2 * nbytes / ms / 1e6


def make_layer(args, placement, comm: Comm, device: torch.device, dtype: torch.dtype) -> EPMoE:
    from moe_layer import deepseek_config, random_slots

    config = deepseek_config(args.hidden, args.inter)
    moe = EPMoE(config, config.to_hf(), 10, 0, placement, comm, device, dtype)
    S = placement.topology.slots_per_gpu
    for name, value in zip(SLOT_TENSORS, random_slots(S, args.hidden, args.inter, device, seed=comm.rank)):
        getattr(moe, name).copy_(value)
    gen = torch.Generator(device=device).manual_seed(7)  # gate and shared expert: the same on every rank
    with torch.no_grad():
        gate = torch.randn(moe.gate.weight.shape, device=device, generator=gen)
        moe.gate.weight.copy_(gate / args.hidden ** 0.5)
        for p in moe.shared_experts.parameters():
            p.copy_(torch.randn(p.shape, device=device, generator=gen) / p.shape[-1] ** 0.5)
    return moe


def bench(args) -> None:
    from moe_layer import E, sample_routing, slots_per_gpu

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu_smoke:
        device, name, dtype = torch.device("cpu"), "cpu", torch.float32
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        name, dtype = torch.cuda.get_device_name(device), torch.bfloat16
    comm = Comm.of(dist.group.WORLD)
    S, T = slots_per_gpu(world), args.tokens
    topology = Topology(world, world, S)
    placement = trivial_placement(E, topology, np.array([10]), 61)
    moe = make_layer(args, placement, comm, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    p_E = torch.as_tensor(placement.replica_count_LE[0], dtype=torch.float32, device=device)
    ids, w = sample_routing(p_E, T, gen, device)
    x = torch.randn(T, args.hidden, device=device, generator=gen).to(dtype)
    live = torch.ones(T, dtype=torch.bool, device=device)
    it, wu = args.iters, args.warmup
    out = {"date": str(date.today()), "device": name, "gpus": world, "torch": torch.__version__, "tokens": T,
           "slots_per_gpu": S, "hidden": args.hidden, "inter": args.inter}

    def record(key: str, value) -> None:  # printed as measured: a run cut short still reports what it had
        out[key] = value
        if rank == 0:
            print(f"{key}: {value}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))

    # 1. the floor: this GPU's expert weights read once
    slot_bytes = sum(getattr(moe, n).nbytes for n in SLOT_TENSORS)
    record("copy_gbs", copy_bandwidth(device, args.copy_mib << 20))
    record("weights_read_ms", slot_bytes / out["copy_gbs"] / 1e6)
    # 2. eager: routing alone, the routed experts (variable and fixed-capacity paths), the whole layer
    route = lambda x_, live_: assign_slots(ids, moe.table, rank, live_)  # noqa: E731
    routed = lambda x_, live_: moe.decode_step(x_, ids, w, live_)  # noqa: E731
    layer = lambda x_, live_: moe.forward_decode(x_, live_).y_TD  # noqa: E731
    record("route_eager_ms", timed(lambda: route(x, live), it, wu, device))
    record("routed_variable_ms", timed(lambda: moe.step_with_ids(x, ids, w), it, wu, device))
    record("routed_decode_eager_ms", timed(lambda: routed(x, live), it, wu, device))
    record("layer_eager_ms", timed(lambda: layer(x, live), it, wu, device))
    # 3. the same as CUDA graphs (routing alone first: it holds no collective)
    route_graphs, routed_graphs, layer_graphs = (DecodeGraphs(f, [T], args.hidden, dtype, device)
                                                 for f in (route, routed, layer))
    record("route_graph_ms", timed(lambda: route_graphs.run(x, T), it, wu, device))
    record("routed_decode_graph_ms", timed(lambda: routed_graphs.run(x, T), it, wu, device))
    record("layer_graph_ms", timed(lambda: layer_graphs.run(x, T), it, wu, device))
    record("capture_s", {"route": route_graphs.capture_seconds[T], "routed": routed_graphs.capture_seconds[T],
                         "layer": layer_graphs.capture_seconds[T]})
    record("layer_graph_vs_weights_read", out["layer_graph_ms"] / out["weights_read_ms"])
    record("routed_graph_vs_weights_read", out["routed_decode_graph_ms"] / out["weights_read_ms"])
    for key, value in checks(moe, routed_graphs, layer_graphs, x, ids, w, live, device).items():
        record(key, value)
    # 4. a reshard's swap: the layout in place (graphs stay valid), or capturing the bucket again
    other = trivial_placement(E, topology, np.array([10]), 61)
    other = type(other)(np.roll(other.phy2log_LP, S, axis=1), E, topology, np.array([10]), 61)
    swap_both = lambda: (moe.use_layout(other), moe.use_layout(placement))  # noqa: E731
    record("swap_in_place_ms", timed(swap_both, it, wu, device) / 2)
    layer_graphs.drop()
    start = time.perf_counter()
    layer_graphs.run(x, T)
    record("recapture_ms", (time.perf_counter() - start) * 1e3)
    dist.destroy_process_group()


def checks(moe: EPMoE, routed_graphs, layer_graphs, x, ids, w, live, device) -> dict:
    """Graph == eager (bits), decode vs variable (relative error, slowest rank), no host sync."""
    T = x.shape[0]
    graph_routed, eager_routed = routed_graphs.run(x, T).clone(), moe.decode_step(x, ids, w, live)
    graph_layer, eager_layer = layer_graphs.run(x, T).clone(), moe.forward_decode(x, live).y_TD
    variable = moe.step_with_ids(x, ids, w)[0]
    rel = ((eager_routed.double() - variable.double()).norm() / variable.double().norm()).reshape(1)
    same = [torch.equal(graph_routed, eager_routed), torch.equal(graph_layer, eager_layer)]
    flags = torch.tensor([float(v) for v in same], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
    synced = "not checked (CPU)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe.forward_decode(x, live)
            synced = "none"
        except RuntimeError as exc:
            synced = f"sync: {str(exc)[:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"graph_equals_eager_routed": bool(flags[0]), "graph_equals_eager_layer": bool(flags[1]),
            "decode_vs_variable_rel": rel.item(), "host_syncs_in_forward_decode": synced}
