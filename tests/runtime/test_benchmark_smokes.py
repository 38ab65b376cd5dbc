"""The runtime benchmarks' CPU smoke modes, so a benchmark cannot break unnoticed: benchmarks/reshard.py
(2 gloo ranks, tiny experts, the Resharder at two rate limits; with reshard_links.py's NCCL-or-gloo
P2P reference: the copy-engine ones need GPUs), benchmarks/full_loop.py (make-model,
serve, load, profile, solve, apply, MoE layer: 2 ranks, one MoE layer, short phases) and
benchmarks/recorder.py's GPU mode on gloo (2 ranks, small EPMoE layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeplace.runtime.synthetic import DEFAULT_ROUTING_TRACE

REPO = Path(__file__).resolve().parents[2]


def test_reshard_links_time_a_call_on_cpu():
    """benchmarks/reshard_links.py's timing on CPU (its copy-engine measurements need two GPUs; its
    NCCL-or-gloo P2P runs in the reshard smoke below)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from reshard_links import seconds, sync_stream

    calls = []
    assert seconds(lambda: calls.append(1), torch.device("cpu"), reps=3) >= 0 and len(calls) == 4  # warm-up + 3
    sync_stream(torch.device("cpu"))


def test_reshard_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "reshard.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(REPO / "benchmarks" / "reshard.py"), "--cpu-smoke", "--layers", "2", "--rates", "0,0.02",
           "--steady-steps", "5", "--step-layers", "3", "--repeats", "2", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["rate_gbps"] for r in result["reshards"]] == [0] * 4 + [0.02] * 4 and result["step_layers"] == 3
    assert result["peer_gbps_per_gpu"]["nccl_p2p"] > 0  # reshard_links.nccl_p2p, on gloo here
    frontier = result["frontier"]  # one row per rate, pooling both repeats' steps
    assert [(f["rate_gbps"], f["jobs"]) for f in frontier] == [(0, 4), (0.02, 4)]
    assert [f["steps_during"] for f in frontier] == [sum(r["steps_during"] for r in result["reshards"][i:i + 4])
                                                     for i in (0, 4)]
    for r in result["reshards"]:
        assert r["state"] == "done" and r["experts_moved"] == r["plan_minimum"] > 0, r
        assert r["busiest_gbps"] > 0 and r["steps_during"] > 0
        assert len(r["rank_phase_seconds"]) == 2 and all(p["transfer"] > 0 for p in r["rank_phase_seconds"]), r
        for laps in r["timelines"]:  # every rank: each layer row staged, posted, moved and checked, in time order
            assert {(lap["row"], lap["phase"]) for lap in laps} >= {(row, phase) for row in (0, 1) for phase in
                                                                   ("stage", "post", "transfer", "check")}
            assert [lap["at_s"] for lap in laps] == sorted(lap["at_s"] for lap in laps) and laps[-1]["phase"] == "swap_wait"
    for r in result["reshards"][4:]:  # paced: the busiest rank's bytes take at least about bytes / rate
        assert r["seconds"] >= 0.5 * r["busiest_gpu_received_bytes"] / 0.02e9, r


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_ROUTING_TRACE.exists(),
                    reason=f"needs {DEFAULT_ROUTING_TRACE} (../shared beside the checkout)")
def test_full_loop_benchmark_cpu_smoke(tmp_path):
    """benchmarks/full_loop.py on CPU, and with it benchmarks/full_loop_steps.py (its CLI runs, profiles, fixed answers)."""
    out = tmp_path / "full_loop.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "full_loop.py"), "run", "--cpu-smoke", "--workdir",
                    str(tmp_path / "work"), "--json", str(out)], check=True, timeout=600,
                   env={**{k: v for k, v in os.environ.items() if not k.startswith("MOEPLACE_RESHARD_")},
                        "MOEPLACE_RESHARD_PRIORITY": "0"})
    result = json.loads(out.read_text())
    assert result["reshard_env"] == {"MOEPLACE_RESHARD_PRIORITY": "0"}  # the server's options, kept with the run
    assert result["load"]["failed"] == 0 and result["load"]["sent"] > 0
    assert result["reshard"]["experts_moved"] > 0
    assert {m["placement"] for m in result["moe_layer"]["results"]} == {"uniform", "before", "after"}
    assert len(result["reshard_laps"]["lines"]) == 6, result["reshard_laps"]  # 2 ranks x 3 reshards
    assert result["reshard_idle"]["experts_moved"] > 0  # the move from scratch, undone with no load
    fresh = result["reshard_fresh"]
    assert fresh["experts_moved"] > 0 and "p50" in fresh["latency_ms_answered_during"]
    # benchmarks/full_loop_report.py's summary (the run prints it last) reads back the JSON the run wrote
    sys.path.insert(0, str(REPO / "benchmarks"))
    from full_loop_report import summary

    text = summary(result)
    assert "reshard from scratch: " in text and "from scratch undone, idle server: " in text and f"requests: {result['load']['sent']} sent, 0 failed" in text
    answers = result["answers"]  # the embedded CPU engine is deterministic: the reshards change no answer
    assert answers["identical_after_reshards"] == answers["fixed_prompts"] == 8
    assert answers["load_prompts"] > 0 and answers["load_prompts_with_several_answers"] == 0


@pytest.mark.slow
def test_recorder_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "recorder.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(REPO / "benchmarks" / "recorder.py"), "gpu", "--cpu-smoke", "--hidden", "256", "--inter", "128",
           "--layers", "1", "--blocks", "2", "--per-block", "2", "--decode-tokens", "8", "--prefill-tokens", "16",
           "--sample-rates", "0.1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"decode@0.1", "prefill@0.1"}
    assert all(r["step_ms_off"] > 0 and r["step_ms_recording"] > 0 and r["collect_ms"] > 0 for r in results.values())
