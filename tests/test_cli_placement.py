"""The placement loop's engine options through the command line: --engine/--dispatch for solve and
evaluate, topology from the served deployment (trace metadata, --like), export notes, apply to SGLang."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from typer.testing import CliRunner

from http_fixture import serving
from moeplace.cli import app
from moeplace.placement import load_placement, placement_to_json, trivial_placement
from moeplace.readers import load_trace
from moeplace.resources import EXAMPLE_TRACE
from moeplace.topology import Topology
from moeplace.trace import save_trace

runner = CliRunner(env={"COLUMNS": "200"})
FAST = ["--time-limit", "2", "--workers", "1"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def served_trace(tmp_path: Path, topology: Topology, expert_bytes: int = 8_700) -> Path:
    """The example trace as if recorded on `moeplace serve` with a trivial layout on `topology`."""
    trace = load_trace(EXAMPLE_TRACE)
    live = trivial_placement(trace.num_experts, topology, trace.layers, trace.num_model_layers)
    metadata = dict(trace.metadata, engine="moeplace", placement=placement_to_json(live), expert_bytes=str(expert_bytes))
    path = tmp_path / "served.safetensors"
    save_trace(type(trace)(trace.counts_WLE, trace.layers, trace.top_k, trace.topk_ids_TLK, trace.tokens_W,
                           num_model_layers=trace.num_model_layers, n_group=trace.n_group,
                           topk_group=trace.topk_group, metadata=metadata, source=str(path)), path)
    return path


def test_engine_sets_the_dispatch_rule(tmp_path):
    out = tmp_path / "p.json"
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10",
                 "--engine", "sglang", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    assert load_placement(out).provenance["options"]["dispatch"] == "sglang-static"
    assert "sglang-static" in " ".join(result.output.split())
    scored = run("evaluate", out, EXAMPLE_TRACE, "--engine", "sglang", "--json")
    assert scored.exit_code == 0, scored.output
    trace = json.loads(scored.output)["traces"][0]
    assert trace["dispatch"] == "sglang-static" and trace["remote_nodes_per_token"] > 0
    equal = json.loads(run("evaluate", out, EXAMPLE_TRACE, "--dispatch", "equal", "--json").output)["traces"][0]
    assert equal["dispatch"] == "equal" and equal["imbalance_mean"] != trace["imbalance_mean"]


def test_split_dispatch_writes_the_shares(tmp_path):
    out = tmp_path / "p.json"
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    placement = load_placement(out)  # --engine moeplace: the runtime's load-proportional split
    assert placement.split_LP is not None and placement.provenance["options"]["dispatch"] == "split"


def test_topology_from_the_served_deployment(tmp_path):
    trace = served_trace(tmp_path, Topology(4, 2, 18))
    out = tmp_path / "p.json"
    result = run("solve", trace, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    topo = load_placement(out).topology
    assert (topo.num_gpus, topo.gpus_per_node, topo.slots_per_gpu, topo.expert_bytes) == (4, 2, 18, 8_700)
    # explicit flags win; a different GPU count needs its own slots
    wider = run("solve", trace, "--gpus", "8", *FAST, "-o", out)
    assert wider.exit_code == 1 and "differs from the 4 GPUs" in " ".join(wider.output.split())
    result = run("solve", trace, "--gpus", "8", "--slots-per-gpu", "9", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    assert (load_placement(out).topology.num_gpus, load_placement(out).topology.gpus_per_node) == (8, 2)
    # byte estimates use the traced model's expert size
    again = tmp_path / "again.json"
    assert run("solve", trace, "--from", out, "--move-weight", "0", "--seed", "3", *FAST, "-o", again).exit_code == 0
    moved = run("evaluate", again, trace, "--baseline", load_placement(out).source)
    assert moved.exit_code == 0, moved.output
    experts = int(" ".join(moved.output.split()).split("experts to move: ")[1].split()[0])
    assert f"({experts * 8_700 / 1e6:.2f} MB at 8700 bytes per expert)" in " ".join(moved.output.split())


def test_topology_missing_is_named(tmp_path):
    result = run("solve", EXAMPLE_TRACE, *FAST, "-o", tmp_path / "p.json")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "give --gpus, --gpus-per-node, --slots-per-gpu or --redundant" in message
    assert "not recorded on moeplace's server" in message and "--like" in message


@pytest.fixture
def live_server():
    """A real HTTP server answering GET /moeplace/placement the way `moeplace serve` does."""
    trace = load_trace(EXAMPLE_TRACE)
    live = trivial_placement(trace.num_experts, Topology(8, 4, 9), trace.layers, trace.num_model_layers)
    api = FastAPI()

    @api.get("/moeplace/placement")
    async def placement():
        return PlainTextResponse(placement_to_json(live), media_type="application/json")

    with serving(api) as url:
        yield url


def test_like_asks_the_server(tmp_path, live_server):
    out = tmp_path / "p.json"
    result = run("solve", EXAMPLE_TRACE, "--like", live_server, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    topo = load_placement(out).topology
    assert (topo.num_gpus, topo.gpus_per_node, topo.slots_per_gpu) == (8, 4, 9)


@pytest.fixture(scope="module")
def placement_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p") / "p.json"
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10",
                 "--method", "greedy", "--workers", "1", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_export_sglang_prints_the_flags_that_must_match(placement_file, tmp_path):
    target = tmp_path / "p.sglang.json"
    result = run("export", placement_file, "--format", "sglang", "-o", target)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (f"--init-expert-location {target} --ep-num-redundant-experts 16 --tp-size 8 --ep-size 8 --nnodes 2 "
            "--moe-a2a-backend deepep --ep-dispatch-algorithm static") in text
    assert "--enable-eplb" in text
    vllm = run("export", placement_file, "--format", "vllm", "-o", tmp_path / "v.safetensors")
    assert "cannot load a placement" in " ".join(vllm.output.split())


def test_apply_to_sglang_says_it_needs_a_restart(placement_file):
    result = run("apply", placement_file, "--engine", "sglang")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "nothing was applied" in text and "python -m sglang.launch_server" in text
    assert f"moeplace export {placement_file} --format sglang" in text
    assert "--ep-num-redundant-experts 16" in text
    assert np.isfinite(load_placement(placement_file).phy2log_LP).all()
