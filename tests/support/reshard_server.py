"""Shared pieces of the live-reshard tests (test_reshard_live.py, test_reshard_faults.py): the server's
ranks and device, placements for them, and an HTTP client's view of answers, placement and jobs.

By default the servers run 4 gloo ranks on CPU (2 nodes x 2). On a GPU machine
`MOEPLACE_TEST_DEVICE=cuda` serves with `--device cuda` (NCCL, one GPU per rank) and
`MOEPLACE_TEST_RANKS=2` serves on 2 ranks (one node) where only 2 GPUs are there."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from moeplace.resources import EXAMPLE_TRACE
from moeplace.client import LoadGenerator
from moeplace.placement import placement_from_dict, save_placement
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.readers import load_trace
from moeplace.topology import Topology
from moeplace.trace import Trace

PROMPTS = ["The expert route of the token", "GPU memory is fast", "def balance(load):"]
DEVICE = os.environ.get("MOEPLACE_TEST_DEVICE", "cpu")
RANKS = int(os.environ.get("MOEPLACE_TEST_RANKS", "4"))
GPUS_PER_NODE = 2
SLOTS = 72  # 64 experts + 8 redundant, over RANKS ranks


def serve_command(placement: Path, port: int, *extra: str) -> list[str]:
    """`moeplace serve` on RANKS ranks of DEVICE; skips the test where DEVICE cannot serve."""
    assert DEVICE in ("cpu", "cuda") and RANKS in (2, 4), (DEVICE, RANKS)
    cmd = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", str(RANKS), "--gpus-per-node", str(GPUS_PER_NODE),
           "--placement", str(placement), "--port", str(port), "--max-batch", "4", *extra]
    if DEVICE == "cpu":
        return cmd
    _skip_without_gpus(RANKS)
    return [*cmd, "--device", "cuda"]


def faulty_server(placement: Path, port: int, faults: str, *, ranks: int = RANKS, device: str = DEVICE,
                  **options) -> tuple[list[str], dict[str, str]]:
    """A server whose reshards meet `faults` (a FaultPlan spec): torchrun starts tests/support/faulty_rank.py
    on `ranks` ranks, the server's options (ServeConfig fields; gpus_per_node GPUS_PER_NODE, max_batch 4
    unless given) in the environment as `moeplace serve` passes them. (command, environment to add)."""
    from moeplace.runtime.launch import CONFIG_ENV, ServeConfig

    if device == "cuda":
        _skip_without_gpus(ranks)
    options = {"gpus_per_node": GPUS_PER_NODE, "max_batch": 4, **options}
    config = ServeConfig(placement=Path(placement), port=port, device=device, **options)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone",
           str(Path(__file__).with_name("faulty_rank.py")), faults]
    return cmd, {CONFIG_ENV: config.to_json()}


def _skip_without_gpus(ranks: int) -> None:
    import torch

    if torch.cuda.device_count() < ranks:
        pytest.skip(f"MOEPLACE_TEST_DEVICE=cuda needs {ranks} CUDA GPUs, this machine has {torch.cuda.device_count()}")


def placement_for(windows: list[int], method: Method, path: Path) -> Path:
    """A placement of the tiny model's 3 MoE layers on RANKS ranks, solved for some OLMoE windows."""
    olmoe = load_trace(EXAMPLE_TRACE).select_windows(windows)
    trace = Trace(olmoe.counts_WLE, np.array([1, 2, 3]), 8, num_model_layers=4, n_group=8, topk_group=4, source="w")
    topology = Topology(RANKS, GPUS_PER_NODE, SLOTS // RANKS)
    save_placement(solve([trace], topology, SolveOptions(method=method, time_limit=2, workers=1)).placement, path)
    return path


def answers(url: str) -> list[str]:
    out = []
    for prompt in PROMPTS:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 6}, timeout=120)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


def live_phy2log(url: str) -> np.ndarray:
    return placement_from_dict(httpx.get(f"{url}/moeplace/placement").json(), "live").phy2log_LP


def submit(url: str, path: Path) -> httpx.Response:
    return httpx.put(f"{url}/moeplace/placement", content=Path(path).read_bytes(), timeout=30)


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/moeplace/reshard/{job_id}").json()
        if status["state"] in ("done", "rolled_back", "failed"):
            return status
        time.sleep(0.2)
    pytest.fail(f"reshard {job_id} did not finish: {status}")


def job_counts(url: str) -> dict[str, float]:
    """{state: count} of reshard jobs, from /metrics."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("moeplace_reshard_jobs{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


class Load(LoadGenerator):
    """One client sending PROMPTS in turn until stopped (at most 200 requests); `texts` holds each
    prompt's answers, so a test can tell that a reshard changed none."""

    def __init__(self, url: str) -> None:
        super().__init__(url, PROMPTS, clients=1, max_tokens=6, limit=200, timeout=120)
