"""`moeplace demo`: the whole loop on the embedded tiny model, on CPU, while requests keep coming.

  serve (4 ranks as 2 nodes x 2, gloo) -> background completions -> profile -> solve -> apply
  (live reshard) -> profile again -> a before/after table.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from moeplace.client import LoadGenerator, ServerClient, free_port, running_server
from moeplace.placement import save_placement, trivial_placement
from moeplace.placer.evaluate import distinct_nodes, gpu_load_LG, group_span, imbalance, moves
from moeplace.placer.solve import SolveOptions, solve
from moeplace.topology import Topology

TOPOLOGY = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=18)  # 64 experts + 8 redundant slots
PROMPTS = ["The expert route of the token", "GPU memory is fast", "def balance(load):"]


def run_live_demo(console: Console, profile_seconds: float = 6.0, solve_seconds: float = 4.0) -> bool:
    """Returns True when no request failed and the fixed prompts answered identically."""
    from moeplace.runtime.config import ModelConfig
    from moeplace.runtime.tiny import calibration_text, default_model_dir

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
                status = client.wait(job["id"])
                console.print(f"profiling {profile_seconds:.0f} s on the new layout ...")
                trace_after = client.profile(profile_seconds, 1.0, Path(tmp) / "after.safetensors", 0.5)
            after_answers = _answers(url)
    same = before_answers == after_answers
    console.print(_table(start, result.placement, trace_before, trace_after, status, load, same))
    return load.failed == 0 and same and status["state"] == "done"


def _table(old, new, trace_before, trace_after, status, load, same) -> Table:
    before = imbalance(gpu_load_LG(old, trace_before.counts_WLE.sum(0)))
    after = imbalance(gpu_load_LG(new, trace_after.counts_WLE.sum(0)))
    table = Table(title="before / after the live reshard (imbalance = max / mean GPU load, measured)",
                  title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for layer, b, a in zip(old.layers, before, after):
        table.add_row(f"layer {layer} imbalance", f"{b:.3f}", f"{a:.3f}")
    table.add_row("mean imbalance", f"{before.mean():.3f}", f"{after.mean():.3f}")
    span_before = group_span(old, trace_before.counts_WLE.sum(0), trace_before.n_group).mean()
    span_after = group_span(new, trace_after.counts_WLE.sum(0), trace_after.n_group).mean()
    table.add_row("nodes a routing group spans", f"{span_before:.2f}", f"{span_after:.2f}")
    if trace_before.topk_ids_TLK is not None and trace_after.topk_ids_TLK is not None:
        nodes_before = distinct_nodes(old, trace_before.topk_ids_TLK).mean()
        nodes_after = distinct_nodes(new, trace_after.topk_ids_TLK).mean()
        table.add_row("distinct nodes per token (sampled)", f"{nodes_before:.2f}", f"{nodes_after:.2f}")
    planned = moves(old, new)
    table.add_section()
    table.add_row("reshard", status["state"], f"{status['seconds']:.2f} s")
    table.add_row("experts moved (plan minimum)", f"{planned.experts}", f"{status['experts_moved']}")
    table.add_row("bytes moved", "", f"{status['bytes_moved'] / 1e6:.1f} MB")
    table.add_row("requests sent / failed", f"{load.sent}", f"{load.failed}")
    table.add_row("fixed prompts answered identically", "", "yes" if same else "NO")
    return table


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

