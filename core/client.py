"""HTTP client of a running `moeplace serve`: profile it, push a placement, follow the reshard; keep
completion requests coming meanwhile (`LoadGenerator`).

Every failure a user can meet (unreachable URL, a 4xx/5xx with the server's reason, a reshard that
rolled back) is a `ValueError` naming the URL, so the CLI prints one line.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

import httpx
import numpy as np

from moeplace.placement import Placement, placement_from_dict, placement_to_json
from moeplace.reshard_job import JobStatus
from moeplace.trace import Trace, load_native_trace


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

    def submit(self, placement: Placement) -> JobStatus:
        path = "/moeplace/placement"
        r = self._call("PUT", path, content=placement_to_json(placement).encode(),
                       headers={"content-type": "application/json"})
        return JobStatus.from_json(self._json(r, path), f"{self.url}{path}")

    def job(self, job_id: str) -> JobStatus:
        path = f"/moeplace/reshard/{job_id}"
        return JobStatus.from_json(self._json(self._call("GET", path), path), f"{self.url}{path}")

    def _json(self, response: httpx.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise ValueError(f"{self.url}{path}: the answer is not JSON: {response.text[:200]!r}") from None

    def wait(self, job_id: str, on_progress: Callable[[JobStatus], None] | None = None,
             timeout: float = 3600) -> JobStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if on_progress:
                on_progress(status)
            if status.state.final:
                return status
            if time.monotonic() > deadline:
                raise ValueError(f"{self.url}: reshard {job_id} still {status.state.value} after {timeout:.0f} s")
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
            # A server that already exited has no group left: the error above is the one to report.
            with suppress(ProcessLookupError):
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
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range (Linux default 32768-60999),
    from which the OS hands out ports itself: torchrun's rendezvous store and every connection of the
    server being started take theirs there, and one of them could take the port between this call and
    the server's bind (seen: "address already in use" on a port this returned)."""
    rng, low = random.Random(), _ephemeral_low()
    for _ in range(200 if low > 11000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: any port the OS gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class LoadGenerator:
    """`clients` threads, each sending one completion after another until the `with` block ends (or
    `limit` requests have been sent): client i takes prompts i, i + clients, ... in turn.

    Counts what was sent, failed and of those rejected with 503 (the first 10 errors kept); for each
    answer (time.monotonic() when it came, seconds it took) and, per prompt, the set of answer texts."""

    def __init__(self, url: str, prompts: list[str], clients: int = 1, max_tokens: int = 16,
                 limit: int | None = None, timeout: float = 300.0) -> None:
        self.url, self.prompts, self.max_tokens, self.limit, self.timeout = url, prompts, max_tokens, limit, timeout
        self.sent = self.failed = self.rejected = 0
        self.errors: list[str] = []
        self.answered: list[tuple[float, float]] = []
        self.texts: dict[str, set[str]] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
            while not self._stop.is_set() and (self.limit is None or self.sent < self.limit):
                prompt = self.prompts[i % len(self.prompts)]
                start = time.monotonic()
                text, error = self._complete(http, prompt)
                self._record(prompt, start, text, error)
                i += len(self._threads)

    def _complete(self, http: httpx.Client, prompt: str) -> tuple[str | None, str | None]:
        """(answer text, None) or (None, what went wrong)."""
        try:
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": self.max_tokens})
            if r.status_code != 200:
                return None, f"HTTP {r.status_code}: {r.text[:200]}"
            return r.json()["choices"][0]["text"], None
        except (httpx.HTTPError, ValueError, LookupError) as exc:  # ValueError, LookupError: a malformed body
            return None, f"{exc.__class__.__name__}: {exc}"

    def _record(self, prompt: str, start: float, text: str | None, error: str | None) -> None:
        with self._lock:
            self.sent += 1
            if error is None:
                now = time.monotonic()
                self.answered.append((now, now - start))
                self.texts.setdefault(prompt, set()).add(text)
                return
            self.failed += 1
            self.rejected += error.startswith("HTTP 503")
            if len(self.errors) < 10:
                self.errors.append(error)

    def report(self, window: tuple[float, float] | None = None, name: str = "window") -> dict:
        """Counts and latency percentiles (ms) of the answered requests; given a (start, end) `window` of
        time.monotonic(), also of those answered within it, as `latency_ms_answered_during_{name}`."""
        out = {"clients": len(self._threads), "sent": self.sent, "failed": self.failed, "rejected_503": self.rejected,
               "errors": self.errors, "latency_ms": _percentiles_ms([s for _, s in self.answered])}
        if window is not None:
            during = [s for t, s in self.answered if window[0] <= t <= window[1]]
            out[f"latency_ms_answered_during_{name}"] = _percentiles_ms(during)
        return out

    def __enter__(self) -> LoadGenerator:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout)


def _percentiles_ms(seconds: list[float]) -> dict:
    """p50, p99 and max in ms (NaN where there are none) and how many."""
    ms = np.array(seconds or [np.nan]) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
            "requests": len(seconds)}
