"""Fixtures of the runtime tests: the tiny model (generated once per session into a temporary folder),
and real servers started as subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from moeplace import client
from moeplace.runtime.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    write_tiny_model(out, seed=0)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    # The runtime tests push tiny tensors, where a second OpenMP thread costs more than it saves.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_variant(tiny_dir, tmp_path_factory):
    """make(edit, name) -> a copy of the tiny model with `edit(tensors)` applied to its tensor dict."""
    import shutil

    from safetensors.torch import load_file, save_file

    def make(edit, name: str = "variant") -> Path:
        out = tmp_path_factory.mktemp(name)
        shutil.copy(tiny_dir / "config.json", out)
        tensors = load_file(tiny_dir / "model.safetensors")
        edit(tensors)
        save_file(tensors, out / "model.safetensors")
        return out

    return make


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One `moeplace serve` for the test modules that only send it requests: 2 gloo ranks, the embedded
    model, a solved placement with redundant replicas, access log on, 2 s read timeout.
    {"url", "model_dir", "placement", "proc" (the `moeplace serve` process), "log"}."""
    from moeplace.runtime.tiny import default_model_dir
    from served import solved_placement

    root = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, MOEPLACE_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    os.environ["MOEPLACE_CACHE"] = env["MOEPLACE_CACHE"]
    model_dir = default_model_dir()
    placement = solved_placement(root / "placement.json")
    port = client.free_port()
    cmd = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", "2", "--gpus-per-node", "1",
           "--placement", str(placement), "--port", str(port), "--max-batch", "4", "--log-level", "info",
           "--read-timeout", "2"]
    with client.running_server(cmd, env, root / "serve.log", port) as (url, proc):
        yield {"url": url, "model_dir": model_dir, "placement": placement, "proc": proc, "log": root / "serve.log"}


@pytest.fixture(scope="session")
def running_server():
    """running_server(cmd, env, log_path, port) -> context manager yielding (url, process)."""
    return client.running_server


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port free on 127.0.0.1 now."""
    return client.free_port
