"""Fixtures of the runtime tests: the tiny model (generated once per session into a temporary folder),
and real servers started as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

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


@contextmanager
def _running(cmd: list[str], env: dict, log_path: Path, port: int, ready_s: float = 180):
    """Run a `moeplace serve` (or torchrun) command in its own process group; yield its URL once /health
    answers 200; stop the whole group afterwards. Fails the test with the log's tail if it never starts."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url, proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def running_server():
    """running_server(cmd, env, log_path, port) -> context manager yielding (url, process)."""
    return _running


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port free on 127.0.0.1 now."""
    return _free_port
