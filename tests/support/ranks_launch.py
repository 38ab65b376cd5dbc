"""Helpers of the multi-rank runtime tests: placements of the tiny model, and launching gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from moeplace.placement import Placement
from moeplace.topology import Topology

LAYERS = np.array([1, 2, 3])  # the tiny model's MoE layers


def replicated(gpus: int, per_node: int, slots: int, seed: int, split: bool = False) -> Placement:
    """Every expert once plus random extra replicas (some on the same GPU as their twin)."""
    rng = np.random.default_rng(seed)
    rows, splits = [], []
    for _ in LAYERS:
        row = rng.permutation(np.concatenate([np.arange(64), rng.choice(64, gpus * slots - 64)]))
        raw = rng.uniform(0.2, 1.0, len(row))
        rows.append(row)
        splits.append(raw / np.bincount(row, weights=raw, minlength=64)[row])
    return Placement(np.stack(rows), 64, Topology(gpus, per_node, slots), LAYERS, 4,
                     split_LP=np.stack(splits) if split else None)


def launch(world: int, job_dir: Path, worker: Path) -> None:
    """Start `world` gloo ranks on 127.0.0.1 (torchrun's environment contract) and wait for all of them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(worker), str(job_dir), "--ranks", str(world)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert done.returncode == 0, f"ranks failed:\n{done.stdout[-5000:]}"
