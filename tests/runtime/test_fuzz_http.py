"""The HTTP API fuzzed, on a real 2-rank server started with `moeplace serve --api-key`.

Hypothesis-generated bodies for POST /v1/completions and PUT /moeplace/placement (wrong types,
missing fields, huge numbers, NaN, nested junk, wrong shapes, another deployment's placement,
bodies over 1 MiB): every answer is 200 for a valid completion, else a 4xx with JSON {"error": ...}
— never a 5xx, never a hang — and afterwards the server answers /health, the live placement and a
greedy completion exactly as before. Security: every endpoint but /health needs the key, which
never reaches a log or a rank's command line; binding off loopback needs a key. The strategies that
make the bodies: tests/support/http_bodies.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from http_bodies import DEEP, bad_placements, completion_bodies, encode, json_value
from moeplace.cli import app as cli_app
from moeplace.placement import trivial_placement
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.launch import ServeConfig
from moeplace.runtime.server import MAX_BODY_BYTES, create_app
from moeplace.runtime.tiny import tiny_config
from processes import rank_pids
from moeplace.topology import Topology

KEY = "fuzz-key-4c1d7e0b9a"
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: Counter = Counter()  # requests sent per endpoint, printed at the end (README figures)
PROMPT = "The expert route of the token"


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory, running_server, free_port):
    root = tmp_path_factory.mktemp("fuzz-http")
    port = free_port()
    key_file = root / "key"
    key_file.write_text(KEY + "\n")
    cmd = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", "2", "--gpus-per-node", "1",
           "--model", str(tiny_dir), "--port", str(port), "--max-batch", "4", "--api-key-file", str(key_file)]
    env = {k: v for k, v in os.environ.items() if k != "MOEPLACE_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    log_path = root / "serve.log"
    with running_server(cmd, env, log_path, port) as (url, proc):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=url, client=client, proc=proc, log=log_path, before=observe(client))
        print(f"\nfuzz_http: {sum(TRIED.values())} requests {dict(TRIED)}")
        client.close()


def observe(client: httpx.Client) -> dict:
    """What must not change: /health, the live placement, a greedy completion."""
    done = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
    assert done.status_code == 200, done.text
    return {"health": client.get("/health").json(), "placement": client.get("/moeplace/placement").text,
            "text": done.json()["choices"][0]["text"]}


def check_answer(r: httpx.Response, *, ok: tuple[int, ...] = ()) -> None:
    """An `ok` status, or a 4xx whose body is JSON {"error": "<reason>"}."""
    if r.status_code in ok:
        return
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    assert isinstance(r.json().get("error"), str) and r.json()["error"], r.text[:300]


# -- completions -------------------------------------------------------------------------------

@FUZZ
@given(case=completion_bodies())
@example(case=(b'{"prompt": "a", "max_tokens": 2, "temperature": 5e-324}', "application/json"))  # killed the engine
@example(case=(b'{"prompt": "\\ud800", "max_tokens": 1}', "application/json"))  # 500: unencodable prompt
@example(case=(b'{"prompt": "a", "max_tokens": 1, "temperature": 0.5, "seed": 1180591620717411303424}', "application/json"))
@example(case=(DEEP.encode(), "application/json"))
def test_completion_bodies_fuzzed(server, case):
    body, content_type = case
    TRIED["POST /v1/completions"] += 1
    r = server.client.post("/v1/completions", content=body, headers={"content-type": content_type})
    check_answer(r, ok=(200,))
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")


# -- live placement ----------------------------------------------------------------------------

def live(server) -> dict:
    return json.loads(server.before["placement"])


@FUZZ
@given(data=st.data())
def test_placement_bodies_fuzzed(server, data):
    body = data.draw(bad_placements(live(server)))
    TRIED["PUT /moeplace/placement"] += 1
    r = server.client.put("/moeplace/placement", content=body, headers={"content-type": "application/json"})
    check_answer(r)  # always 4xx: no fuzzed body may start a reshard


@settings(FUZZ, max_examples=30)
@given(body=st.one_of(st.fixed_dictionaries({"window_seconds": json_value()}), json_value()))
def test_profile_start_bodies_fuzzed(server, body):
    TRIED["POST /moeplace/profile/start"] += 1
    r = server.client.post("/moeplace/profile/start", content=encode(body), headers={"content-type": "application/json"})
    check_answer(r, ok=(200,))
    assert server.client.post("/moeplace/profile/stop").status_code == 200


@pytest.mark.parametrize("path, method", [("/v1/completions", "POST"), ("/moeplace/placement", "PUT")])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_one_mib_get_413(server, path, method, chunked):
    """Before the fix a chunked body (no Content-Length) of any size was read whole into memory."""
    size = MAX_BODY_BYTES + 4096

    def chunks():
        yield b'{"prompt": "'
        for _ in range(size // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    TRIED[f"{method} {path}"] += 1
    content = chunks() if chunked else b"x" * size
    r = server.client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["error"]


def test_unknown_paths_and_methods_answer_json(server):
    for method, path, status in [("GET", "/nope", 404), ("DELETE", "/v1/completions", 405),
                                 ("GET", "/moeplace/reshard/none", 404), ("POST", "/health", 405)]:
        TRIED[f"{method} {path}"] += 1
        r = server.client.request(method, path)
        assert r.status_code == status
        check_answer(r)


# -- hostile placements (each once killed or stalled the server) -------------------------------

def put(server, body: bytes) -> httpx.Response:
    TRIED["PUT /moeplace/placement"] += 1
    return server.client.put("/moeplace/placement", content=body, headers={"content-type": "application/json"})


def test_deep_provenance_is_refused_and_the_server_keeps_resharding(server):
    """The live placement with provenance nested 500 levels (4 KB) was accepted; pickling it for the
    other ranks killed the engine thread, leaving a server that answered 503 and 409 forever."""
    doc = live(server)
    r = put(server, encode({**doc, "provenance": {"note": "@NEST@"}}))
    assert r.status_code == 400 and "nested more than 16 levels" in r.json()["error"], r.text
    assert server.client.get("/health").json() == {"status": "ok"}
    again = put(server, server.before["placement"].encode())  # the live layout again: a reshard moving nothing
    assert again.status_code == 202, again.text
    job = again.json()["id"]
    deadline = time.monotonic() + 120
    while (state := server.client.get(f"/moeplace/reshard/{job}").json()["state"]) not in ("done", "failed",
                                                                                           "rolled_back"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state == "done"


@pytest.mark.parametrize("where", ["provenance", "nvlink_gbps", "gpu_memory_budget"])
def test_non_finite_numbers_are_refused_and_get_stays_strict_json(server, where):
    doc = live(server)
    if where == "provenance":
        doc["provenance"] = {"budget": math.inf}
    else:
        doc["topology"] = {**doc["topology"], where: math.nan}
    r = put(server, encode(doc))
    assert r.status_code == 400 and "is not a JSON number" in r.json()["error"], r.text
    json.loads(server.client.get("/moeplace/placement").text, parse_constant=lambda c: pytest.fail(c))


def test_size_amplifying_placement_is_refused_before_any_array(server):
    """1,035,055 bytes like these asked rank 0 for 170 GiB (HTTP 500 with a traceback); 124 KB for 2.4 GB
    and blocked /health for 6 s."""
    slots = 330_000
    doc = {**live(server), "num_experts": 64, "topology": {"num_gpus": 1, "gpus_per_node": 1, "slots_per_gpu": slots},
           "phy2log": [list(range(64)) + [0] * (slots - 64)]}
    body = encode(doc)
    assert 900_000 < len(body) < MAX_BODY_BYTES
    start = time.monotonic()
    r = put(server, body)
    assert r.status_code == 400 and "topology.num_gpus is 1, the server runs 2" in r.json()["error"], r.text
    assert time.monotonic() - start < 30
    assert server.client.get("/health").status_code == 200


# -- security ----------------------------------------------------------------------------------

ENDPOINTS = [("GET", "/metrics"), ("GET", "/moeplace/placement"), ("PUT", "/moeplace/placement"),
             ("POST", "/v1/completions"), ("POST", "/moeplace/profile/start"), ("POST", "/moeplace/profile/stop"),
             ("GET", "/moeplace/profile/dump"), ("GET", "/moeplace/reshard/abc"), ("GET", "/openapi.json"),
             ("GET", "/nope")]
WRONG_KEYS = [None, "", f"Bearer {KEY[:-1]}", f"bearer {KEY}", f"Bearer  {KEY}", f"Basic {KEY}", KEY, f"Bearer {KEY}x"]


def test_every_endpoint_but_health_needs_the_key(server):
    for method, path in ENDPOINTS:
        for auth in WRONG_KEYS:
            headers = {} if auth is None else {"Authorization": auth}
            TRIED["auth"] += 1
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a"}, timeout=30)
            assert r.status_code == 401, (method, path, auth, r.status_code)
            assert "API key" in r.json()["error"] and KEY not in r.text
    # a stranger's body is refused before it is read, however large
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1), timeout=30)
    assert r.status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}


def test_every_route_of_the_app_needs_the_key():
    """In process, over the app's own route table: a route added later cannot forget the key."""
    config = tiny_config()
    model = SimpleNamespace(config=config, placement=trivial_placement(64, Topology(2, 1, 32), np.arange(1, 4), 4),
                            dtype=torch.float32)
    engine = Engine(model, EngineConfig(), None, eos_id=257)  # never run: no request gets past the key
    app = create_app(engine, model, tokenizer=None, model_name="m", api_key=KEY)
    routes = [(method, route.path.replace("{job_id}", "x")) for route in app.routes if isinstance(route, APIRoute)
              for method in route.methods]
    assert len(routes) >= 9
    with TestClient(app) as client:
        for method, path in routes:
            r = client.request(method, path)
            assert r.status_code == (200 if path == "/health" else 401), (method, path)
        for method, path in [("GET", "/moeplace/placement"), ("GET", "/metrics")]:
            assert client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_binding_off_loopback_needs_a_key():
    done = CliRunner(env={"MOEPLACE_API_KEY": None, "COLUMNS": "200"}).invoke(cli_app, ["serve", "--host", "0.0.0.0"])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit)
    assert "binding to 0.0.0.0 (not loopback) requires --api-key" in done.stderr
    for host in ("10.0.0.1", "::", "example.com"):
        with pytest.raises(ValueError, match="requires --api-key"):
            ServeConfig(host=host)
        ServeConfig(host=host, api_key="k")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        ServeConfig(host=host)


# -- after everything: the server is as it was ------------------------------------------------

def test_server_unchanged_after_fuzzing_and_key_never_logged(server):
    assert observe(server.client) == server.before
    assert KEY not in server.log.read_text()
    # read from a file, handed to the ranks in their environment: on no command line
    ranks = rank_pids(server.proc.pid)
    assert len(ranks) == 2
    for pid in [server.proc.pid, *ranks]:
        assert KEY not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
