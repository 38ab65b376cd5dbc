"""Recorder overhead: MoE steps with the expert recorder on against the same steps with it off.

    # CPU: the embedded tiny model's whole forward, one process
    python benchmarks/recorder.py cpu [--blocks 20] [--batch 8] [--tokens 64] [--sample-rate 0.1]
    # GPU: DeepSeek-V3-shaped EPMoE layers (hidden 7168, 256 experts, top-8, FP8), one process per GPU
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      torchrun --nproc-per-node G benchmarks/recorder.py gpu [--layers 2] [--sample-rates 0,0.1] [--json out.json]
    # what each recorder operation costs per call (GPU if there is one)
    python benchmarks/recorder.py launches

Recording costs, per MoE layer and step, one add of the dispatch's per-slot counts (which the
dispatch computes anyway) into the layer's window counters, and, with a sample rate, a random
permutation and one gather of the sampled tokens' ids across all layers; none waits for the GPU.
Once per window (the engine's `stats_interval`, one second) every rank folds its slot counts to
logical experts, all-reduces them, and rank 0 copies them to the host: that collect is timed on its
own and charged at one per second of steps. "Off" turns the counters off (EPMoE.counting) and samples
nothing. On and off alternate in blocks, so a drift of the machine's speed touches both alike.
Reported: median step time of each, the per-step overhead, the collect's time and its share of a second.
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
import torch


def set_recording(model, on: bool, sample_rate: float) -> None:
    for moe in model.moe_layers:
        moe.counting = on
    model.sample_rate = sample_rate if on else 0.0


def alternate(step, model, sample_rate: float, blocks: int, per_block: int, sync) -> dict[bool, list[float]]:
    """Seconds per step of `per_block` steps, blocks alternating off / on (a warm-up block of each first)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (blocks + 1)):
        on = i % 2 == 1
        set_recording(model, on, sample_rate)
        sync()
        start = time.perf_counter()
        for _ in range(per_block):
            step()
        sync()
        if i >= 2:
            times[on].append((time.perf_counter() - start) / per_block)
        model.collect_stats()  # between blocks: the samples and counters do not pile up
    return times


def time_collect(model, reps: int, sync) -> float:
    """Milliseconds of one collect (all_reduce of the counters, one copy to the host), median."""
    out = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        model.collect_stats()
        out.append(time.perf_counter() - start)
    return float(np.median(out)) * 1e3


def summary(times: dict[bool, list[float]], collect_ms: float, **extra) -> dict:
    off, on = (float(np.median(times[k])) * 1e3 for k in (False, True))
    return {"step_ms_off": off, "step_ms_recording": on, "overhead_per_step": on / off - 1,
            "collect_ms": collect_ms, "collect_share_of_1s": collect_ms / 1000.0,
            "overhead_total": on / off - 1 + collect_ms / 1000.0, "blocks_each": len(times[True]), **extra}


def cpu(args) -> dict:
    from moeplace.runtime.batch import pad_right
    from moeplace.runtime.model import EPModel
    from moeplace.runtime.router_fit import calibration_text
    from moeplace.runtime.tiny import default_model_dir
    from moeplace.runtime.tokenizer import ByteTokenizer

    torch.set_num_threads(1)
    model = EPModel.load(default_model_dir(), None, group=None, device=torch.device("cpu"))
    tok = ByteTokenizer()
    prompts = [tok.encode(calibration_text(seed, args.tokens))[: args.tokens] for seed in range(args.batch)]
    ids, mask = pad_right(prompts, tok.pad_id)
    times = alternate(lambda: model.forward(ids, mask), model, args.sample_rate, args.blocks, args.per_block,
                      lambda: None)
    return summary(times, time_collect(model, 50, lambda: None), device="cpu (1 thread)", batch=args.batch,
                   tokens=args.tokens, sample_rate=args.sample_rate, model="embedded tiny model, whole forward")


def gpu(args) -> dict:
    import torch.distributed as dist

    from moe_layer import deepseek_config, random_slots, slots_per_gpu  # benchmarks/ is sys.path[0]
    from moeplace.placement import trivial_placement
    from moeplace.runtime.comm import Comm
    from moeplace.runtime.model import EPModel
    from moeplace.runtime.moe import EPMoE
    from moeplace.topology import Topology

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu_smoke:  # the script's own check on a machine without GPUs: gloo, use small --hidden/--inter
        device, sync, name = torch.device("cpu"), (lambda: None), "cpu"
        dist.init_process_group("gloo")
    else:
        device, sync = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.cuda.synchronize
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        name = torch.cuda.get_device_name(device)
    comm = Comm.of(dist.group.WORLD)
    config = deepseek_config(args.hidden, args.inter)
    hf_config = config.to_hf()
    layers = np.arange(3, 3 + args.layers)
    placement = trivial_placement(256, Topology(world, world, slots_per_gpu(world)), layers, 61)
    weights = random_slots(slots_per_gpu(world), args.hidden, args.inter, device, seed=rank)
    moes = []
    for row, layer in enumerate(layers):
        moe = EPMoE(config, hf_config, int(layer), row, placement, comm, device, torch.bfloat16)
        for buf, value in zip(("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf"), weights):
            getattr(moe, buf).copy_(value)
        moe.gate.weight.normal_(0, 0.02)
        moes.append(moe)
    del weights
    model = EPModel(None, config, placement, moes, comm, device)
    results = {}
    runs = [(f"{step}@{rate:g}", tokens, rate) for rate in map(float, args.sample_rates.split(","))
            for step, tokens in (("decode", args.decode_tokens), ("prefill", args.prefill_tokens))]
    for step_name, tokens, rate in runs:
        x = torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16)

        def step():
            with torch.no_grad():
                h, ids_L = x, []
                for moe in moes:
                    out = moe(h)
                    h = out.y_TD
                    ids_L.append(out.ids_TK)
                model.record_samples(ids_L)

        times = alternate(step, model, rate, args.blocks, args.per_block, sync)
        results[step_name] = summary(times, time_collect(model, 50, sync), tokens_per_rank=tokens)
    out = {"device": name, "gpus": world, "moe_layers": args.layers, "torch": torch.__version__, "results": results,
           "model": "DeepSeek-V3-shaped EPMoE layers (gate, routing, dispatch, FP8 experts, combine, shared expert)"}
    dist.barrier()  # every rank done with its collectives before any tears its group down
    dist.destroy_process_group()
    return out if rank == 0 else {}


def launches(args) -> dict:
    """Microseconds per call (host launch and GPU together, 2,000 calls after warm-up) of what the
    recorder adds to a step: the window add of one layer, and sampling for 2 and 58 layers."""
    from moeplace.runtime.model import sample_rows

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for T in (128, 4096):
        ids = torch.randint(0, 256, (T, 8), device=device)
        counts_GX = torch.zeros(4, 73, dtype=torch.int64, device=device)
        window_GS = torch.zeros(4, 72, dtype=torch.int64, device=device)
        rng, gen = np.random.default_rng(0), torch.Generator(device=device).manual_seed(0)
        calls = {"window add, 1 layer": lambda: window_GS.add_(counts_GX[:, :-1]),
                 "sample 2 layers": lambda: sample_rows([ids] * 2, 0.1, rng, 10**9, gen),
                 "sample 58 layers": lambda: sample_rows([ids] * 58, 0.1, rng, 10**9, gen)}
        for name, call in calls.items():
            for _ in range(50):
                call()
            sync()
            start = time.perf_counter()
            for _ in range(2000):
                call()
            sync()
            out[f"{name}, {T} tokens: us"] = (time.perf_counter() - start) / 2000 * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="where", required=True)
    for name in ("cpu", "gpu"):
        p = sub.add_parser(name)
        p.add_argument("--blocks", type=int, default=20)
        p.add_argument("--per-block", type=int, default=10)
        p.add_argument("--json", type=Path, default=None)
    c = sub.choices["cpu"]
    c.add_argument("--sample-rate", type=float, default=0.1)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--tokens", type=int, default=64)
    g = sub.choices["gpu"]
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--hidden", type=int, default=7168)
    g.add_argument("--inter", type=int, default=2048)
    g.add_argument("--decode-tokens", type=int, default=128)
    g.add_argument("--prefill-tokens", type=int, default=4096)
    g.add_argument("--sample-rates", default="0,0.1", help="runs at each rate (0: counting alone)")
    g.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU (use small --hidden/--inter)")
    lc = sub.add_parser("launches", help="per-call cost of the recorder's operations")
    lc.add_argument("--cpu", action="store_true")
    lc.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = {"cpu": cpu, "gpu": gpu, "launches": launches}[args.where](args)
    if out:
        out["date"] = str(date.today())
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    if args.where == "gpu":
        # A rank skips the interpreter's teardown, as serve's ranks do (runtime/launch.py): on a loaded
        # machine a gloo rank has aborted there ("terminate called without an active exception", a
        # background thread still joinable at exit) after all its work and output were done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
