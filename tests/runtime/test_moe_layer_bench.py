"""benchmarks/moe_layer.py's CPU smoke modes on 2 gloo ranks: `run` on a prepared folder written here
(random per-expert probabilities, trivial placements under every method's name: `prepare` itself needs
the real traces and minutes of solving), and `decode` (benchmarks/moe_layer_decode.py: eager vs graph
runner; graphs are CUDA-only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplace import client
from moeplace.placement import save_placement, trivial_placement
from moeplace.topology import Topology

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"
SMALL = ["--hidden", "256", "--inter", "128", "--cpu-smoke"]


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    port = str(client.free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port, str(BENCH),
           *args]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_run_smoke(tmp_path):
    """benchmarks/moe_layer.py on CPU, and with it benchmarks/moe_layer_timing.py (time_steps, bandwidth, summaries)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    probs = rng.dirichlet(np.ones(256), size=1).tolist()
    workloads = {"prefill_in4096": probs, "decode_in1000out1000": probs}
    (data / "probs.json").write_text(json.dumps({"layers": [10], "rows": [0], "experts": 256, "probs": workloads}))
    for method in ("trivial", "eplb", "greedy", "cpsat"):
        save_placement(trivial_placement(256, Topology(2, 2, 144), np.array([10]), 61), data / f"G2_{method}.json")
    done = torchrun(["run", "--data", str(data), "--iters", "1", "--warmup", "0", "--shrink", "32",
                     "--steps", "decode", "--json", str(tmp_path / "out.json"), *SMALL], tmp_path)
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [r["placement"] for r in results] == ["uniform", "trivial", "eplb", "greedy", "cpsat"], done.stdout
    assert all(r["step_ms"] > 0 and sum(r["rows_per_gpu"]) == 2 * 4 * 8 for r in results)


@pytest.mark.slow
def test_decode_smoke(tmp_path):
    torchrun(["decode", "--tokens", "8", "--iters", "1", "--warmup", "0", "--copy-mib", "1",
              "--json", str(tmp_path / "decode.json"), *SMALL], tmp_path)
    out = json.loads((tmp_path / "decode.json").read_text())
    assert out["graph_equals_eager_routed"] and out["graph_equals_eager_layer"]
    assert out["decode_vs_variable_rel"] == 0.0  # the reference path: the same bits as the variable path
    assert all(out[k] > 0 for k in ("weights_read_ms", "route_graph_ms", "layer_graph_ms", "recapture_ms"))
