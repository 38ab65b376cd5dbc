"""Every script in examples/ runs, as a user would run it (a subprocess from outside the checkout), and
its output is a trace moeplace reads. A new example without an entry here fails the coverage test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplace.readers import load_trace

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
OLMOE_SOURCE = REPO.parent / "shared" / "traces" / "olmoe-mixtral-routing-analysis" / "olmoe_routing_counts.npz"


def run_example(name: str, *args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_routing_jsonl_to_trace_example(tmp_path):
    stdout = run_example("routing_jsonl_to_trace.py", "--example", "-o", "trace.safetensors", cwd=tmp_path)
    trace = load_trace(tmp_path / "trace.safetensors")
    assert (trace.num_windows, trace.num_layers, trace.num_experts, trace.top_k) == (3, 4, 8, 2)
    assert trace.counts_WLE.sum() == 3 * 4 * 40 * 2  # every (token, layer) routed to two experts
    assert trace.topk_ids_TLK.shape == (120, 4, 2) and (trace.topk_ids_TLK >= 0).all()
    for w in range(3):  # the per-token sample agrees with the counts
        ids = trace.topk_ids_TLK[w * 40:(w + 1) * 40]
        for layer in range(4):
            np.testing.assert_array_equal(np.bincount(ids[:, layer].ravel(), minlength=8), trace.counts_WLE[w, layer])
    assert "next: moeplace solve" in stdout


def test_routing_jsonl_to_trace_names_a_bad_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"layer": 0, "token_idx": 0, "experts": [1, 2]}) + "\n" + json.dumps({"layer": 1}) + "\n")
    out = subprocess.run([sys.executable, str(EXAMPLES / "routing_jsonl_to_trace.py"), str(log), "-o", "t.safetensors"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "log.jsonl:2: needs 'layer', 'token_idx' and an 'experts' list" in out.stderr


def test_make_olmoe_trace_example(tmp_path):
    if not OLMOE_SOURCE.exists():
        pytest.skip(f"{OLMOE_SOURCE} not found (the ../shared traces are not checked out)")
    run_example("make_olmoe_trace.py", "--output", "olmoe.safetensors", cwd=tmp_path)
    assert load_trace(tmp_path / "olmoe.safetensors").counts_WLE.shape == (6, 3, 64)


def test_every_example_has_a_smoke_test():
    tested = {"routing_jsonl_to_trace.py", "make_olmoe_trace.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    trace = load_trace(tmp_path / "mine.safetensors")
    assert trace.num_experts == 64 and trace.layers.tolist() == [1, 2, 3] and trace.n_group == 8
