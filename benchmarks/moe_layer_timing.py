"""`moe_layer.py run`'s measurements: its steps timed phase by phase on every rank, NCCL's own bandwidth
for comparison, and the per-rank timings summarised into one result row (and its printed line)."""

from __future__ import annotations

import numpy as np

PHASES = {"route": ("route",), "dispatch": ("dispatch", "dispatch_a2a"), "experts": ("experts",),
          "combine": ("combine_a2a", "combine")}


def time_steps(steps, iters: int, warmup: int):
    """steps: [(moe, x, ids, w)], timed in turn within each iteration (so a drift of the host's speed
    touches every placement alike) -> per step ([iters, phases + 2] ms of this rank: each phase
    (PHASES order), then the two all_to_alls alone; the Traffic of its last run)."""
    import torch
    import torch.distributed as dist

    from moeplace.runtime.moe_output import PhaseTimer

    device = steps[0][1].device
    timer, rows, traffic = PhaseTimer(device), [[] for _ in steps], [None for _ in steps]
    flag = torch.zeros(1, device=device)
    for i in range(warmup + iters):
        for j, (moe, x, ids, w) in enumerate(steps):
            dist.all_reduce(flag)  # every rank starts the step together, from an idle stream
            if x.is_cuda:
                torch.cuda.synchronize()
            timer.start()
            _, traffic[j] = moe.step_with_ids(x, ids, w, timer)
            laps = timer.read()
            if i >= warmup:
                rows[j].append([sum(laps[p] for p in names) for names in PHASES.values()]
                               + [laps["dispatch_a2a"], laps["combine_a2a"]])
    return [(torch.tensor(r, dtype=torch.float64, device=device), t) for r, t in zip(rows, traffic)]


def nccl_bandwidth(device, world: int, rank: int, nbytes: int = 512 << 20) -> dict:
    """GB/s leaving each GPU: all_to_all_single of equal chunks (3 sizes), and a P2P ring (send to the next
    rank, receive from the previous)."""
    import torch
    import torch.distributed as dist

    def bench(fn, reps=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        t = torch.tensor([float(np.median(times))], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    out = {}
    for size in (32 << 20, 128 << 20, 512 << 20):
        src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = bench(lambda: dist.all_to_all_single(dst, src))
        out[f"all_to_all_{size >> 20}MiB"] = size * (world - 1) / world / ms / 1e6
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def ring():
        ops = [dist.P2POp(dist.isend, src, (rank + 1) % world), dist.P2POp(dist.irecv, dst, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    out["p2p_ring"] = nbytes / bench(ring) / 1e6
    return out


def all_gather(t, world: int) -> np.ndarray:
    """[world, *t.shape] on the host: every rank's t."""
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.stack(out).cpu().numpy()


def summarise(layer, step, name, t_RIX, loads_G, wire_RX) -> dict:
    """t_RIX [ranks, iterations, phases + 2 a2a] ms -> medians: step = slowest rank's total per iteration."""
    phases = list(PHASES)
    total_RI = t_RIX[:, :, : len(phases)].sum(axis=2)
    # The last rank to reach an all_to_all waits for no one: its time is the transfer itself.
    a2a = {k: float(np.median(t_RIX[:, :, len(phases) + i].min(axis=0))) for i, k in enumerate(("dispatch", "combine"))}
    out = {"layer": layer, "step": step, "placement": name, "step_ms": float(np.median(total_RI.max(axis=0))),
           **{f"{p}_ms": float(np.median(t_RIX[:, :, i].max(axis=0))) for i, p in enumerate(phases)},
           "a2a_ms": a2a, "rows_per_gpu": loads_G, "imbalance": max(loads_G) / (sum(loads_G) / len(loads_G)),
           "wire_bytes_max": {k: float(wire_RX[:, i].max()) for i, k in enumerate(("dispatch", "combine"))}}
    out["a2a_gbs"] = {k: out["wire_bytes_max"][k] / a2a[k] / 1e6 for k in a2a}
    return out


def line(r: dict) -> str:
    return (f"L{r['layer']:<2} {r['step']:7} {r['placement']:8} step {r['step_ms']:7.3f} ms "
            f"({r['vs_uniform']:.3f}x uniform) | route {r['route_ms']:.3f} "
            f"dispatch {r['dispatch_ms']:.3f} experts {r['experts_ms']:.3f} combine {r['combine_ms']:.3f} | "
            f"imbalance {r['imbalance']:.3f} | a2a GB/s dispatch {r['a2a_gbs']['dispatch']:.0f} "
            f"combine {r['a2a_gbs']['combine']:.0f}")
