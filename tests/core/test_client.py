"""LoadGenerator against a stub `/v1/completions` (stdlib HTTP server): counts, 503s, texts, report."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moeplace.client import LoadGenerator, _ephemeral_low, free_port


class _Stub(BaseHTTPRequestHandler):
    """Answers "<prompt>!" to every prompt but "busy", which gets 503."""

    def do_POST(self) -> None:
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        status, body = (503, {"error": "queue full"}) if prompt == "busy" else (200, {"choices": [{"text": prompt + "!"}]})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_load_generator_counts_answers_rejections_and_latency(url):
    start = time.monotonic()
    with LoadGenerator(url, ["a", "busy", "b", "c"], clients=2, limit=40, timeout=10) as load:
        while load.sent < 40:
            time.sleep(0.01)
    report = load.report((start, time.monotonic()), "test")
    # client 0 takes prompts a, b; client 1 busy, c: each about half its requests
    assert 40 <= load.sent <= 41 and load.failed == load.rejected == report["rejected_503"] > 0
    assert load.texts == {"a": {"a!"}, "b": {"b!"}, "c": {"c!"}}
    assert len(load.errors) == min(10, load.failed) and all(e.startswith("HTTP 503") for e in load.errors)
    assert report["clients"] == 2 and report["latency_ms"]["requests"] == load.sent - load.failed
    assert report["latency_ms_answered_during_test"] == report["latency_ms"]
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]


def test_load_generator_report_without_window_or_answers_has_no_latencies():
    load = LoadGenerator("http://127.0.0.1:9", ["a"])  # never started
    report = load.report()
    assert "latency_ms_answered_during_window" not in report and report["latency_ms"]["requests"] == 0


def test_free_port_is_outside_the_ports_the_os_hands_out():
    """A port the OS could give torchrun's store or a connection (the ephemeral range) could be taken
    between free_port() and the server's bind."""
    low = _ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 10000 <= port < low or low <= 11000
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed
