"""Starting and stopping `moeplace serve` (2 gloo ranks) like a process manager would: SIGTERM and
SIGINT with requests in flight and idle: every client gets an answer or an error, no process of the
server is left 10 s later, and the next server starts on the same port; a rank that dies takes the
whole server down with a one-line reason and a non-zero exit."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from moeplace.client import free_port
from processes import alive, rank_pids, wait_gone

pytestmark = pytest.mark.slow
STOP_S = 10.0


def start(tiny_dir: Path, port: int, log: Path) -> tuple[subprocess.Popen, list[int]]:
    """`moeplace serve` in its own session (as under a process manager); (process, rank pids) once ready."""
    cmd = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", "2", "--model", str(tiny_dir), "--port", str(port),
           "--max-batch", "2"]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 240
    while "ready at" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, rank_pids(proc.pid)


def ask(url: str, stream: bool) -> str:
    """'answer', 'error' (a 4xx/5xx JSON, or an error event in the stream) or what else happened."""
    body = {"prompt": "a long answer", "max_tokens": 200, "stream": stream}
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    except httpx.HTTPError as exc:
        return f"no answer: {exc!r}"
    if r.status_code != 200:
        return "error" if "error" in r.json() else f"status {r.status_code}"
    if stream and '"error"' in r.text:
        return "error"
    return "answer" if (not stream or r.text.endswith("data: [DONE]\n\n")) else f"cut: {r.text[-200:]!r}"


def stop_and_check(proc: subprocess.Popen, ranks: list[int], signum: int) -> None:
    proc.send_signal(signum)  # to `moeplace serve` alone, as `kill PID` does
    assert not wait_gone([proc.pid, *ranks], STOP_S), "processes left after the stop signal"
    assert proc.wait(timeout=5) == 0


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT)], ids=["sigterm-busy-sigint-idle"])
def test_stop_signals_end_every_process_and_answer_every_client(tiny_dir, tmp_path, first, second):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, ranks = start(tiny_dir, port, tmp_path / "a.log")
    assert len(ranks) == 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(ask, url, stream) for stream in (False, True, False, True)]
        time.sleep(1.5)  # in flight: two running (max-batch 2), two waiting
        stop_and_check(proc, ranks, first)
        outcomes = [a.result(timeout=60) for a in answers]
    assert set(outcomes) <= {"answer", "error"}, outcomes
    assert "error" in outcomes  # 200 tokens each could not all have been generated
    # the port is free at once: the next server starts on it, and stops idle on SIGINT (Ctrl-C)
    proc, ranks = start(tiny_dir, port, tmp_path / "b.log")
    assert ask(url, stream=False) == "answer"
    stop_and_check(proc, ranks, second)
    for log in ("a.log", "b.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and text.count("ready at") == 1, text[-3000:]


def test_a_dead_rank_takes_the_whole_server_down(tiny_dir, tmp_path):
    port = free_port()
    proc, ranks = start(tiny_dir, port, tmp_path / "c.log")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(ask, f"http://127.0.0.1:{port}", False)
        time.sleep(1.0)
        os.kill(ranks[1], signal.SIGKILL)
        assert answer.result(timeout=60) != "answer"
    assert not wait_gone([proc.pid, *ranks], STOP_S)
    assert proc.wait(timeout=5) != 0
    log = (tmp_path / "c.log").read_text()
    assert "Traceback" not in log and "error: " in log, log[-3000:]
    assert not alive(ranks)
