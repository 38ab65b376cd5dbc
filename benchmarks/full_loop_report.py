"""The full loop's results (benchmarks/full_loop.py): the JSON written as the run goes, the reshard's
numbers from `moeplace apply`'s output and the plan, the live imbalance before / after, the summary."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np


class Results:
    """The run's JSON, rewritten whole after every step."""

    def __init__(self, path: Path | None, head: dict) -> None:
        self.path, self.data = path, dict(head, seconds={})

    def add(self, step: str, value, seconds: float | None = None) -> None:
        self.data[step] = value
        if seconds is not None:
            self.data["seconds"][step] = round(seconds, 2)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")
            os.replace(tmp, self.path)


def reshard_numbers(apply_out: str, old, new, expert_bytes: int, wall: float, p2p: dict) -> dict:
    """The server's report of the reshard (as `moeplace apply` prints it) and, from the plan, the bytes
    the busiest GPU received over its links, against the P2P bandwidth measured in step 1."""
    from moeplace.runtime.reshard_plan import NETWORK_LINKS, plan_reshard

    found = re.search(r"live: (\d+) experts moved \(([\d.]+) MB\) in ([\d.]+) s, ([\d.]+) GB/s", apply_out)
    if found is None:
        raise SystemExit(f"moeplace apply printed no result line:\n{apply_out[-2000:]}")
    experts, seconds, gbps = int(found[1]), float(found[3]), float(found[4])
    phases = lambda line: {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+) s", line)}  # noqa: E731
    rank0 = re.search(r"^time: (.*)$", apply_out, re.M)
    ranks = [phases(line) for line in re.findall(r"^time on rank \d+: (.*)$", apply_out, re.M)]
    plan = plan_reshard(old, new)
    network = np.isin(plan.kind_X, NETWORK_LINKS)
    received_G = np.bincount(plan.dst_slot_X[network] // new.topology.slots_per_gpu, minlength=new.topology.num_gpus)
    busiest = float(received_G.max() * expert_bytes)
    return {"state": "done", "experts_moved": experts, "bytes_moved": experts * expert_bytes, "seconds": seconds,
            "bandwidth_gbps_all_gpus": gbps, "apply_wall_seconds": wall,
            "phase_seconds_rank0": phases(rank0[1]) if rank0 else {}, "phase_seconds_per_rank": ranks,
            "network_experts_received_per_gpu": received_G.tolist(), "busiest_gpu_received_bytes": busiest,
            "busiest_gpu_gbps": busiest / seconds / 1e9 if seconds else None,
            "p2p_gbps_per_gpu": p2p["gbps_per_gpu"],
            "busiest_gpu_share_of_p2p": busiest / seconds / 1e9 / p2p["gbps_per_gpu"] if seconds else None}


def balance(model: Path, old, new, work: Path, model_report: dict) -> dict:
    """Per MoE layer: the live GPU load imbalance (max / mean) before and after, the solved layout's on the
    before trace (what the solver planned for), and the live popularity against the trace's."""
    from moeplace.placer.evaluate import gpu_load_LG, imbalance
    from moeplace.readers import load_trace
    from moeplace.runtime.config import ModelConfig
    from moeplace.runtime.router_fit import distance
    from moeplace.runtime.synthetic import target_shares

    before, after = (load_trace(work / f"{name}.safetensors").counts_WLE.sum(axis=0) for name in ("before", "after"))
    targets_LE, _ = target_shares(Path(model_report["routing_trace"]), ModelConfig.load(model), model_report["trace_layers"])
    live = [distance(row / row.sum(), t) for row, t in zip(before, targets_LE)]
    return {"layers": old.layers.tolist(),
            "imbalance_before": imbalance(gpu_load_LG(old, before)).round(4).tolist(),
            "imbalance_after": imbalance(gpu_load_LG(new, after)).round(4).tolist(),
            "imbalance_solved_on_before_trace": imbalance(gpu_load_LG(new, before)).round(4).tolist(),
            "live_popularity_vs_trace": {"corr": [c for c, _ in live], "tvd": [t for _, t in live]}}


def summary(r: dict) -> str:
    lines = [f"# {r['date']} {r['device']}, {r['gpus']} ranks, {r['args']['moe_layers']} MoE layers ({r['args']['preset']})",
             f"NCCL P2P {r['p2p']['gbps_per_gpu']:.1f} GB/s per GPU"]
    b, load = r["balance"], r["load"]
    for i, layer in enumerate(b["layers"]):
        lines.append(f"layer {layer}: GPU load max/mean {b['imbalance_before'][i]:.3f} -> {b['imbalance_after'][i]:.3f} "
                     f"(live popularity vs trace: corr {b['live_popularity_vs_trace']['corr'][i]:.3f}, "
                     f"TV {b['live_popularity_vs_trace']['tvd'][i]:.3f})")
    reshards = (("reshard", "reshard"), ("reshard from scratch", "reshard_fresh"),
                ("from scratch undone, idle server", "reshard_idle"))
    for label, rs in ((label, r[key]) for label, key in reshards if key in r):  # runs before 2026-11-30 21:00: no idle
        lines.append(f"{label}: {rs['experts_moved']} experts, {rs['bytes_moved'] / 1e9:.2f} GB in {rs['seconds']:.3f} s "
                     f"({rs['bandwidth_gbps_all_gpus']:.1f} GB/s all GPUs; busiest GPU received "
                     f"{rs['busiest_gpu_received_bytes'] / 1e9:.2f} GB = {rs['busiest_gpu_gbps'] or 0:.1f} GB/s, "
                     f"{100 * (rs['busiest_gpu_share_of_p2p'] or 0):.1f}% of P2P)")
        for rank, phases in enumerate(rs.get("phase_seconds_per_rank") or [rs["phase_seconds_rank0"]]):
            lines.append(f"  rank {rank}: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    for name in ("before", "after"):
        step = r[name]["engine_step_ms_mean"]
        lines.append(f"engine step ({name}): {step:.1f} ms mean over {r[name]['engine_steps']} steps" if step else
                     f"engine step ({name}): no steps")
    for m in r["moe_layer"]["results"]:
        lines.append(f"MoE L{m['layer']} {m['tokens_per_rank']:>5} tok/rank {m['placement']:8} step {m['step_ms']:.3f} ms "
                     f"({m['vs_uniform']:.3f}x uniform), experts per GPU ms {[round(x, 3) for x in m['experts_ms_per_gpu']]}")
    all_ms, during_ms = load["latency_ms"], load["latency_ms_answered_during_reshard"]
    lines.append(f"requests: {load['sent']} sent, {load['failed']} failed; latency p50 / p99 {all_ms['p50']:.0f} / "
                 f"{all_ms['p99']:.0f} ms, answered during the reshard ({during_ms['requests']}) "
                 f"{during_ms['p50']:.0f} / {during_ms['p99']:.0f} ms")
    a = r["answers"]
    lines.append(f"answers: {a['identical_after_reshards']} of {a['fixed_prompts']} fixed prompts (alone, idle server) "
                 f"identical after both reshards; {a['load_prompts_with_several_answers']} of {a['load_prompts']} load "
                 "prompts got more than one answer over the run (batched with different requests)")
    return "\n".join(lines)
