"""Solver benchmark on the real DeepSeek-V3 expert-load statistics (../shared/traces/sglang-dsv3-ep-statistics).

Leave-one-workload-out: for each of the 8 files, plan on the other 7 and score on the held-out one;
report the mean over files of the mean-over-layers and worst-layer imbalance (equal split across
replicas, and best split), for DeepSeek EPLB, moeplace's greedy warm start and moeplace's CP-SAT
solver, at EP8/288, EP32/288 (4 nodes of 8), EP72/288 (9 nodes), EP64/320 (8 nodes). Then one full
58-layer x 256-expert solve on all 8 files, timed.

    python benchmarks/solver.py [--time-limit 20] [--configs ep8,ep32,ep72,ep64] [--layers N] [--json out.json]

The data files' licence is unstated: they are read from ../shared, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np

from moeplace.placer.crossval import leave_one_out
from moeplace.placer.evaluate import gpu_load_LG, imbalance
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.readers import load_trace
from moeplace.topology import Topology
from moeplace.trace import Trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "sglang-dsv3-ep-statistics"
CONFIGS = {  # name: (GPUs, GPUs per node, slots per GPU)
    "ep8": (8, 8, 36),
    "ep32": (32, 8, 9),
    "ep72": (72, 8, 4),
    "ep64": (64, 8, 5),
}
TARGETS = {"ep8": 1.015, "ep32": 1.04, "ep72": 1.09}


def load_traces(folder: Path, layers: int | None) -> list[Trace]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"no SGLang statistics in {folder}: this benchmark needs ../shared beside the checkout")
    traces = [load_trace(f) for f in files]
    if layers:
        traces = [Trace(t.counts_WLE[:, :layers], t.layers[:layers], t.top_k, num_model_layers=t.num_model_layers,
                        n_group=t.n_group, topk_group=t.topk_group, metadata=t.metadata, source=t.source)
                  for t in traces]
    return traces


def run(traces: list[Trace], configs: list[str], options: SolveOptions) -> list[dict]:
    rows = []
    for name in configs:
        gpus, per_node, slots = CONFIGS[name]
        topology = Topology(gpus, per_node, slots)
        for method in (Method.eplb, Method.eplb_global, Method.greedy, Method.cpsat):
            start = time.monotonic()
            cv = leave_one_out(traces, topology, replace(options, method=method))
            row = {
                "config": f"{name.upper()}/{topology.num_slots}", "method": method.value,
                "imbalance_mean": cv.mean_imbalance(), "imbalance_worst_layer": cv.worst_layer_imbalance(),
                "best_split_mean": cv.mean_best_split(), "best_split_worst_layer": cv.worst_best_split(),
                "layers_worse_than_greedy": cv.layers_worse_than_greedy(1e-4),
                "duplicates": int(sum(f.duplicates for f in cv.folds)),
                "solve_seconds": cv.mean_seconds(),
                "group_node_span": cv.mean_group_span(),
                "per_file": {f.name: round(float(f.imbalance_L.mean()), 4) for f in cv.folds},
                "target": TARGETS.get(name),
            }
            rows.append(row)
            print(_line(row), f"  [{time.monotonic() - start:.0f} s]", flush=True)
    return rows


def full_solve(traces: list[Trace], options: SolveOptions) -> dict:
    topology = Topology(32, 8, 9)
    result = solve(traces, topology, replace(options, method=Method.cpsat))
    hottest = [r.hottest for r in result.reports]
    # In-sample: every file was planned on. Against the held-out scores this separates what the
    # optimiser leaves on the table from what is lost to workload shift.
    in_sample = [float(imbalance(gpu_load_LG(result.placement, t.counts_WLE.sum(0))).mean()) for t in traces]
    out = {"layers": len(result.reports), "experts": traces[0].num_experts, "seconds": result.seconds,
           "planning_hottest_mean": float(np.mean(hottest)), "planning_hottest_worst": float(np.max(hottest)),
           "gap_mean": float(np.mean([r.gap for r in result.reports])),
           "in_sample_imbalance_mean": float(np.mean(in_sample))}
    print(f"full solve EP32/288 on all {len(traces)} files: {out['layers']} layers x {out['experts']} experts "
          f"in {out['seconds']:.1f} s wall, worst-workload hottest mean {out['planning_hottest_mean']:.4f}, "
          f"in-sample imbalance mean over files {out['in_sample_imbalance_mean']:.4f}", flush=True)
    return out


def _line(row: dict) -> str:
    return (f"{row['config']:>10} {row['method']:>11}  imbalance {row['imbalance_mean']:.4f} "
            f"(worst layer {row['imbalance_worst_layer']:.4f})  best split {row['best_split_mean']:.4f} "
            f"({row['best_split_worst_layer']:.4f})  worse-than-greedy layers {row['layers_worse_than_greedy']}  "
            f"dups {row['duplicates']}  group span {row['group_node_span']:.2f}  solve {row['solve_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, default=SHARED)
    parser.add_argument("--configs", default="ep8,ep32,ep72,ep64")
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--traffic-weight", type=float, default=SolveOptions.traffic_weight)
    parser.add_argument("--layers", type=int, default=None, help="only the first N MoE layers (quick runs)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    traces = load_traces(args.traces, args.layers)
    options = SolveOptions(time_limit=args.time_limit, traffic_weight=args.traffic_weight, workers=args.workers)
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"time limit {args.time_limit} s per solve, {len(traces)} files x {traces[0].num_layers} layers", flush=True)
    rows = run(traces, args.configs.split(","), options)
    full = None if args.skip_full else full_solve(traces, options)
    if args.json:
        args.json.write_text(json.dumps({"date": str(date.today()), "cores": os.cpu_count(),
                                         "argv": sys.argv[1:], "rows": rows, "full_solve": full}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
