"""HTTP client of a running `moeplace serve`: profile it, push a placement, follow the reshard.

Every failure a user can meet (unreachable URL, a 4xx/5xx with the server's reason, a reshard that
rolled back) is a `ValueError` naming the URL, so the CLI prints one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx

from moeplace.placement import Placement, placement_from_dict, placement_to_json
from moeplace.trace import Trace, load_native_trace

FINAL_STATES = ("done", "rolled_back", "failed")


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ValueError(f"{self.url}{path}: cannot reach the server ({exc.__class__.__name__}: {exc})") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                reason = body.get("error", response.text) if isinstance(body, dict) else response.text[:200]
            except ValueError:
                reason = response.text[:200]
            raise ValueError(f"{self.url}{path}: HTTP {response.status_code}: {reason}")
        return response

    def placement(self) -> Placement:
        return placement_from_dict(self._call("GET", "/moeplace/placement").json(), f"{self.url}/moeplace/placement")

    def profile(self, duration: float, window_seconds: float, tmp: Path, sample_rate: float = 0.0) -> Trace:
        """Record for `duration` seconds; the trace is read back through the trace-file reader."""
        self._call("POST", "/moeplace/profile/start", json={"window_seconds": window_seconds, "sample_rate": sample_rate})
        time.sleep(duration)
        self._call("POST", "/moeplace/profile/stop")
        tmp.write_bytes(self._call("GET", "/moeplace/profile/dump").content)
        return load_native_trace(tmp)

    def submit(self, placement: Placement) -> dict:
        return self._call("PUT", "/moeplace/placement", content=placement_to_json(placement).encode(),
                          headers={"content-type": "application/json"}).json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/moeplace/reshard/{job_id}").json()

    def wait(self, job_id: str, on_progress: Callable[[dict], None] | None = None, timeout: float = 3600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if on_progress:
                on_progress(status)
            if status["state"] in FINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise ValueError(f"{self.url}: reshard {job_id} still {status['state']} after {timeout:.0f} s")
            time.sleep(0.2)


@contextmanager
def running_server(cmd: list[str], env: dict, log_path: Path, port: int, ready_s: float = 180):
    """Run a `moeplace serve` (or torchrun) command in its own process group, logging to `log_path`;
    yield (url, process) once /health answers 200; stop the whole group afterwards. ValueError with the
    log's tail if it exits or is not ready within `ready_s`."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_s
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ValueError(f"the server did not start:\n{log_path.read_text()[-3000:]}")
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
