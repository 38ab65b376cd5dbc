"""`moeplace demo`: the whole loop on the embedded tiny model, on CPU, while requests keep coming.

  serve (4 ranks as 2 nodes x 2, gloo) -> background completions -> profile -> solve -> apply
  (live reshard) -> profile again -> a before/after table of what was measured.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from moeplace.client import LoadGenerator, ServerClient, free_port, running_server
from moeplace.placement import Placement, save_placement, trivial_placement
from moeplace.placer.evaluate import distinct_nodes, gpu_load_LG, group_span, imbalance, moves
from moeplace.placer.solve import SolveOptions, solve
from moeplace.reshard_job import JobState, JobStatus
from moeplace.topology import Topology
from moeplace.trace import Trace

TOPOLOGY = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=18)  # 64 experts + 8 redundant slots
PROMPTS = ["The expert route of the token", "GPU memory is fast", "def balance(load):"]


def run_live_demo(console: Console, profile_seconds: float = 6.0, solve_seconds: float = 4.0) -> bool:
    """Returns True when no request failed and the fixed prompts answered identically."""
    from moeplace.runtime.config import ModelConfig
    from moeplace.runtime.router_fit import calibration_text
    from moeplace.runtime.tiny import default_model_dir

    config = ModelConfig.load(default_model_dir())
    with tempfile.TemporaryDirectory() as tmp:
        start = trivial_placement(config.n_routed_experts, TOPOLOGY, np.array(config.moe_layers), config.num_hidden_layers)
        save_placement(start, Path(tmp) / "start.json")
        port = free_port()
        with running_server(_serve_command(Path(tmp) / "start.json", port), dict(os.environ, OMP_NUM_THREADS="1"),
                            Path(tmp) / "serve.log", port) as (url, _):
            client = ServerClient(url)
            console.print(f"serving the tiny DeepSeek-V3 model on 4 ranks (2 nodes x 2) at {url}")
            before_answers = _answers(url)
            prompts = [calibration_text(seed, 60) for seed in range(40)]
            with LoadGenerator(url, prompts, clients=2, max_tokens=4, limit=500) as load:
                console.print(f"profiling {profile_seconds:.0f} s under load ...")
                trace_before = client.profile(profile_seconds, 1.0, Path(tmp) / "before.safetensors", 0.5)
                result = solve([trace_before], TOPOLOGY, SolveOptions(time_limit=solve_seconds, workers=1), old=start)
                console.print(f"solved in {result.seconds:.1f} s; applying while the load continues ...")
                job = client.submit(result.placement)
                status = client.wait(job.id)
                console.print(f"profiling {profile_seconds:.0f} s on the new layout ...")
                trace_after = client.profile(profile_seconds, 1.0, Path(tmp) / "after.safetensors", 0.5)
            after_answers = _answers(url)
    same = before_answers == after_answers
    before, after = Measured.of(start, trace_before), Measured.of(result.placement, trace_after)
    console.print(results_table(start.layers, before, after))
    for line in summary_lines(status, moves(start, result.placement).experts, load.sent, load.failed, same):
        console.print(line, highlight=False)
    return load.failed == 0 and same and status.state is JobState.DONE


@dataclass(frozen=True)
class Measured:
    """What one profile of the served model says about a placement, per MoE layer [L]."""

    imbalance_L: np.ndarray  # max / mean GPU load, equal split over replicas
    group_span_L: np.ndarray  # nodes a routing group's experts sit on, load-weighted
    distinct_nodes_L: np.ndarray | None  # nodes a sampled token's experts are served from

    @classmethod
    def of(cls, placement: Placement, trace: Trace) -> Measured:
        total_LE = trace.counts_WLE.sum(0)
        nodes = None if trace.topk_ids_TLK is None else distinct_nodes(placement, trace.topk_ids_TLK)
        return cls(imbalance(gpu_load_LG(placement, total_LE)), group_span(placement, total_LE, trace.n_group), nodes)


def results_table(layers: np.ndarray, before: Measured, after: Measured) -> Table:
    """Before / after the live reshard, measured on the served model; every row says which way is better."""
    table = Table(title="measured while serving: trivial layout (before) vs solved layout (after); "
                        "imbalance = max / mean GPU load", title_justify="left")
    for name, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("better", "left")):
        table.add_column(name, justify=justify)
    for row, layer in enumerate(layers):
        table.add_row(f"layer {layer}: GPU imbalance", f"{before.imbalance_L[row]:.3f}",
                      f"{after.imbalance_L[row]:.3f}", "lower (1 = perfect)")
    table.add_row("mean GPU imbalance", f"{before.imbalance_L.mean():.3f}", f"{after.imbalance_L.mean():.3f}",
                  "lower (1 = perfect)")
    table.add_row("nodes a routing group spans", f"{before.group_span_L.mean():.2f}",
                  f"{after.group_span_L.mean():.2f}", "lower (less traffic)")
    if before.distinct_nodes_L is not None and after.distinct_nodes_L is not None:
        table.add_row("nodes per token (sampled)", f"{before.distinct_nodes_L.mean():.2f}",
                      f"{after.distinct_nodes_L.mean():.2f}", "lower (less traffic)")
    table.caption = ("The solver trades node traffic for GPU balance (solve --traffic-weight): "
                     "the node rows may rise while the imbalance falls.")
    return table


def summary_lines(status: JobStatus, planned_experts: int, sent: int, failed: int, same: bool) -> list[str]:
    """The reshard and the traffic around it, one fact per line."""
    return [
        f"reshard: {status.state.value} in {status.seconds:.2f} s; {status.experts_moved} experts moved "
        f"({planned_experts} is the fewest this placement needs), {status.bytes_moved / 1e6:.1f} MB",
        f"requests during the demo: {sent} sent, {failed} failed (0 failed is the goal)",
        f"fixed prompts answered identically before and after: {'yes' if same else 'NO'}",
        "next: your own model and traces: moeplace serve --model DIR; moeplace profile --url URL -o trace.safetensors;"
        " moeplace solve trace.safetensors --gpus N --gpus-per-node M -o placement.json;"
        " moeplace apply placement.json --url URL",
    ]


def _serve_command(placement: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", "4", "--gpus-per-node", "2",
            "--placement", str(placement), "--port", str(port), "--max-batch", "8"]


def _answers(url: str) -> list[str]:
    out = []
    for prompt in PROMPTS:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 8}, timeout=300)
        r.raise_for_status()
        out.append(r.json()["choices"][0]["text"])
    return out

