"""The OpenAI-style API of a real 2-rank `moeplace serve` (the shared `served` fixture): streaming read by
OpenAI's own Python client and by a plain SSE parser, stop, top_p, chat, models, refused fields; a
client that goes away frees its slot; a slow client is cut off; one ready line; an access-log line per
request; only loopback sockets; an idle server's CPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from served import sse_events

from processes import cpu_seconds, listening_addresses, rank_pids

PROMPT = "The expert route of the token"


@pytest.fixture(scope="module")
def url(served):
    return served["url"]


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def text_of(url: str, max_tokens: int = 12, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_streaming_returns_the_non_streamed_answer(url, oai):
    whole = oai.completions.create(model="moeplace-tiny-dsv3", prompt=PROMPT, max_tokens=12)
    chunks = list(oai.completions.create(model="moeplace-tiny-dsv3", prompt=PROMPT, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "stream": True}, timeout=120)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert "".join(e["choices"][0]["text"] for e in events) == whole.choices[0].text
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["object"] == "text_completion"


def test_chat_and_models(url, oai):
    assert [m.id for m in oai.models.list()] == ["moeplace-tiny-dsv3"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do experts go?"}]
    whole = oai.chat.completions.create(model="moeplace-tiny-dsv3", messages=messages, max_tokens=10)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    streamed = list(oai.chat.completions.create(model="moeplace-tiny-dsv3", messages=messages, max_tokens=10,
                                                stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant"
    template = "System: Be brief.\n\nUser: Where do experts go?\n\nAssistant:"
    assert whole.usage.prompt_tokens == len(template.encode()) + 1  # the plain template, bytes + BOS


def test_stop_strings_end_the_text(url):
    full = text_of(url)["text"]
    stop = full[4:6]
    cut = full.index(stop)
    stopped = text_of(url, stop=[stop, "never appears"])
    assert stopped == {**stopped, "text": full[:cut], "finish_reason": "stop"}
    events = sse_events(httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "stop": stop,
                                                                  "stream": True}, timeout=120))
    assert "".join(e["choices"][0]["text"] for e in events) == full[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_top_p_narrows_sampling_to_the_likeliest_tokens(url):
    greedy = text_of(url)["text"]
    for seed in range(3):  # the nucleus of a tiny top_p is the argmax token alone
        assert text_of(url, temperature=1.0, top_p=1e-9, seed=seed)["text"] == greedy
    sampled = {text_of(url, temperature=1.0, top_p=1.0, seed=seed)["text"] for seed in range(3)}
    assert sampled - {greedy}  # the whole distribution draws other tokens


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "n", 2), ("/v1/completions", "logprobs", 1), ("/v1/completions", "best_of", 3),
    ("/v1/completions", "echo", True), ("/v1/completions", "suffix", "x"), ("/v1/completions", "presence_penalty", 0.5),
    ("/v1/completions", "logit_bias", {"65": 5}), ("/v1/completions", "frobnicate", 1),
    ("/v1/chat/completions", "tools", [{"type": "function"}]), ("/v1/chat/completions", "logprobs", True),
    ("/v1/completions", "temperature", "0.5"), ("/v1/completions", "top_p", 0), ("/v1/completions", "stop", [""]),
])
def test_unsupported_or_wrong_fields_are_refused_by_name(url, path, field, value):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url + path, json={**body, "max_tokens": 2, field: value}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"], r.text


def test_another_model_name_is_404(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "model": "gpt-4"}, timeout=60)
    assert r.status_code == 404 and "moeplace-tiny-dsv3" in r.json()["error"]


def generated_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("moeplace_generated_tokens_total "):
            return float(line.split()[1])
    return 0.0


def test_a_client_that_goes_away_frees_its_slot(url):
    """Two 256-token requests whose clients leave early (a stream closed after its first chunk, a
    plain request timed out) stop generating: far fewer than 512 tokens are made."""
    before = generated_tokens(url)
    body = {"prompt": PROMPT, "max_tokens": 256, "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(120, read=1.0))
    last, still_since = generated_tokens(url), time.monotonic()
    while time.monotonic() - still_since < 2.0:  # until nothing is generated for 2 s
        time.sleep(0.25)
        if (now := generated_tokens(url)) != last:
            last, still_since = now, time.monotonic()
    assert last - before < 256, f"{last - before} tokens generated for clients that left"


def test_a_slow_client_is_cut_off_and_others_are_served(url):
    host, port = url.removeprefix("http://").split(":")
    for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never end
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro"):  # nor the body
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(partial)
            start = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server (--read-timeout 2), not by this 30 s timeout
            assert time.monotonic() - start < 25
    assert text_of(url, max_tokens=2)["finish_reason"] == "length"


def test_profile_start_while_recording_is_409(url):
    assert httpx.post(f"{url}/moeplace/profile/start", json={}, timeout=60).status_code == 200
    try:
        again = httpx.post(f"{url}/moeplace/profile/start", json={"window_seconds": 2}, timeout=60)
        assert again.status_code == 409 and "in progress" in again.json()["error"]
    finally:
        assert httpx.post(f"{url}/moeplace/profile/stop", timeout=60).status_code == 200


def test_ready_line_access_log_and_loopback_only(served):
    log = served["log"].read_text()
    ready = [line for line in log.splitlines() if "ready at" in line]
    assert len(ready) == 1, log[-2000:]
    assert f"ready at {served['url']} (2 rank(s) on cpu, model moeplace-tiny-dsv3, 36 slots per GPU, 8 redundant)" \
        in ready[0]
    assert '"POST /v1/completions HTTP/1.1" 200' in log
    ranks = rank_pids(served["proc"].pid)
    assert len(ranks) == 2
    listening = listening_addresses([served["proc"].pid, *ranks])
    assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening


def test_an_idle_server_uses_little_cpu(served):
    ranks = rank_pids(served["proc"].pid)
    time.sleep(1.0)  # past the last request's collect
    before = [cpu_seconds(pid) for pid in ranks]
    time.sleep(5.0)
    used = [(cpu_seconds(pid) - b) / 5.0 for pid, b in zip(ranks, before)]
    assert max(used) < 0.05, f"share of a core per rank while idle: {used}"


def test_serve_memory_benchmark_cpu_smoke(served):
    """benchmarks/serve_memory.py --cpu-smoke against the shared server: two rounds, every rank's RSS."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_memory.py"
    done = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--url", served["url"], "--serve-pid",
                           str(served["proc"].pid)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["requests"] for r in rows] == [4, 8] and all(len(r["rss_mb"]) == 2 for r in rows)
