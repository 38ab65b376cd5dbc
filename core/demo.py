"""`moeplace demo`: the solve/evaluate loop on the embedded OLMoE trace, on CPU, in seconds.

Plans a placement on five text domains (arxiv, book, c4, github, wikipedia) and scores it on the
held-out sixth (tulu, instruction data): the workload shift a deployment meets when its traffic
changes. Compares the trivial layout, DeepSeek EPLB, moeplace's greedy warm start and its CP-SAT
solver.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeplace.placement import trivial_placement
from moeplace.placer.evaluate import evaluate, gpu_load_LG, imbalance
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.readers import load_trace
from moeplace.resources import EXAMPLE_TRACE
from moeplace.topology import Topology

DEMO_TOPOLOGY = Topology(num_gpus=8, gpus_per_node=4, slots_per_gpu=10)  # 64 experts + 16 redundant


def run_demo(console: Console, time_limit: float, trace_path: Path = EXAMPLE_TRACE) -> Table:
    if not trace_path.exists():
        raise ValueError(f"{trace_path}: the embedded example trace is missing (run from a moeplace checkout)")
    trace = load_trace(trace_path)
    names = json.loads(trace.metadata.get("window_names", "[]")) or [str(w) for w in range(trace.num_windows)]
    planning = trace.select_windows(list(range(trace.num_windows - 1)),
                                    source=f"{trace_path.name}[{','.join(names[:-1])}]")
    held_out = trace.select_windows([trace.num_windows - 1], source=f"{trace_path.name}[{names[-1]}]")
    topo = DEMO_TOPOLOGY
    console.print(f"[bold]moeplace demo[/]: {trace.metadata.get('model', 'model')} routing counts, "
                  f"{trace.num_experts} experts, layers {trace.layers.tolist()}, top-{trace.top_k}; "
                  f"{topo.num_gpus} GPUs in {topo.num_nodes} nodes, {topo.num_slots} slots")
    console.print(f"plan on: {', '.join(names[:-1])}   score on held-out: {names[-1]}")
    table = Table(title_justify="left", title="imbalance = max / mean GPU load, mean over layers (1.00 = perfect, lower is better)")
    for col in ("placement", "planning worst", "held-out", "held-out worst layer", "held-out best split", "solve s"):
        table.add_column(col, justify="left" if col == "placement" else "right")
    placements = {"trivial (p % E)": (trivial_placement(trace.num_experts, topo, trace.layers, trace.num_model_layers), 0.0)}
    for method in (Method.eplb, Method.greedy, Method.cpsat):
        result = solve([planning], topo, SolveOptions(method=method, time_limit=time_limit, workers=1))
        placements[f"{method.value}"] = (result.placement, result.seconds)
    for name, (placement, seconds) in placements.items():
        planning_worst = max(imbalance(gpu_load_LG(placement, c)).mean() for c in planning.counts_WLE)
        score = evaluate(placement, held_out)
        table.add_row(name, f"{planning_worst:.3f}", f"{score.imbalance_L.mean():.3f}",
                      f"{score.imbalance_L.max():.3f}", f"{score.imbalance_best_L.mean():.3f}",
                      f"{seconds:.1f}")
    console.print(table)
    console.print("next: the whole loop on a served model, live: [bold]moeplace demo[/]; on your own traces: "
                  "[bold]moeplace solve TRACE... --gpus N --gpus-per-node M -o placement.json[/]", highlight=False)
    return table
