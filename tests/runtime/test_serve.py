"""`moeplace serve` end to end: 2 gloo ranks, a real HTTP server on loopback, a solved placement with
redundant replicas, answers compared with a single-process model; the OpenAI-style API (streaming,
stop, top_p, chat, models, refused fields) read with OpenAI's own client; disconnects, slow clients,
the ready line, the access log, what the server listens on and its idle CPU."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from moeplace.resources import EXAMPLE_TRACE
from moeplace.placement import load_placement, placement_from_dict, save_placement
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.readers import load_trace
from moeplace.runtime.batch import greedy_continue
from moeplace.runtime.model import EPModel
from moeplace.runtime.tokenizer import ByteTokenizer
from moeplace.topology import Topology
from moeplace.trace import Trace

PROMPTS = ["The expert route of the token", "GPU memory is fast", "def balance(load):"]


def greedy_reference(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """Single process, trivial placement, one sequence at a time."""
    tok = ByteTokenizer()
    model = EPModel.load(model_dir, None, group=None, device=torch.device("cpu"))
    (out,) = greedy_continue(model, [tok.encode(prompt)], max_tokens, tok.pad_id)
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


@pytest.fixture(scope="module")
def server(served):
    return served


def complete(url: str, prompt: str, max_tokens: int = 8, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_completion_matches_single_process_reference(server):
    for prompt in PROMPTS[:2]:
        body = complete(server["url"], prompt, max_tokens=8)
        assert body["choices"][0]["text"] == greedy_reference(server["model_dir"], prompt, 8)
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(ByteTokenizer().encode(prompt))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_batch_and_agree(server):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda p: complete(server["url"], p, 6), PROMPTS * 2))
    texts = [b["choices"][0]["text"] for b in bodies]
    assert texts[:3] == texts[3:]  # the same prompt gets the same greedy answer whatever its batch


def test_sampling_with_seed_is_reproducible(server):
    a = complete(server["url"], PROMPTS[0], 6, temperature=0.8, seed=7)["choices"][0]["text"]
    b = complete(server["url"], PROMPTS[0], 6, temperature=0.8, seed=7)["choices"][0]["text"]
    assert a == b


def test_live_placement_is_the_one_served(server):
    r = httpx.get(f"{server['url']}/moeplace/placement")
    assert r.status_code == 200
    live = placement_from_dict(r.json(), "live")
    assert np.array_equal(live.phy2log_LP, load_placement(server["placement"]).phy2log_LP)


def test_metrics(server):
    complete(server["url"], PROMPTS[2], 2)
    text = httpx.get(f"{server['url']}/metrics").text
    assert 'moeplace_layer_balancedness{layer="1"}' in text
    assert 'moeplace_rank_routed_tokens_total{rank="1"}' in text
    assert "moeplace_step_seconds_count" in text


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens must be in"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x" * 5000}, 400, "limit"),
])
def test_bad_requests_get_4xx_json_and_server_keeps_serving(server, body, status, fragment):
    r = httpx.post(f"{server['url']}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert httpx.get(f"{server['url']}/health").status_code == 200


def test_malformed_json_body(server):
    r = httpx.post(f"{server['url']}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert complete(server["url"], "ok", 1)["choices"]


# -- bad input to `moeplace serve`: one line, exit 1, before any rank starts ---------------------

def serve_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeplace.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, COLUMNS="200", **env))


def one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    text = " ".join(done.stderr.split())
    for fragment in fragments:
        assert fragment in text, text


def test_serve_rejects_bad_reshard_options(server):
    one_line_error(serve_cli("--nproc", "2", MOEPLACE_RESHARD_COPY_STREAMS="0"),
                   "MOEPLACE_RESHARD_COPY_STREAMS must be a whole number from 1 to 16, got '0'")


def test_serve_rejects_placement_for_other_rank_count(server, tmp_path):
    one_line_error(serve_cli("--nproc", "4", "--placement", str(server["placement"])), "2 GPUs", "4 rank(s)")


def test_serve_rejects_placement_for_other_model(server, tmp_path):
    olmoe = load_trace(EXAMPLE_TRACE)
    wrong = Trace(olmoe.counts_WLE, np.array([0, 7, 15]), 8, source="olmoe")
    path = tmp_path / "wrong.json"
    save_placement(solve([wrong], Topology(2, 1, 36), SolveOptions(method=Method.greedy, workers=1)).placement, path)
    one_line_error(serve_cli("--nproc", "2", "--placement", str(path)), "wrong.json", "not the MoE layers")


def test_serve_rejects_non_loopback_without_key():
    one_line_error(serve_cli("--host", "0.0.0.0"), "requires --api-key")


def test_serve_rejects_folder_that_is_not_a_model(tmp_path):
    one_line_error(serve_cli("--model", str(tmp_path)), "not a model folder")


def test_serve_rejects_what_it_cannot_start_before_any_rank(tmp_path, monkeypatch):
    """Port in use, CUDA asked for without CUDA, a missing model: one line each, exit 1, no rank started."""
    import socket

    from typer.testing import CliRunner

    from moeplace.cli import app
    from moeplace.runtime import supervise

    def no_ranks(*_, **__):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(supervise, "run_ranks", no_ranks)
    runner = CliRunner(env={"COLUMNS": "200", "MOEPLACE_API_KEY": None})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [(["--port", port], f"port {port} on 127.0.0.1 is in use"),
                 (["--model", str(tmp_path / "nope")], "nope: not a model folder")]
        if not torch.cuda.is_available():
            cases.append((["--device", "cuda", "--nproc", "2"], "--device cuda: this PyTorch has no CUDA"))
        for args, message in cases:
            done = runner.invoke(app, ["serve", *args])
            assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (args, done.output)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_serve_reads_the_api_key_from_a_file(tmp_path):
    empty = tmp_path / "key"
    empty.write_text("\n")
    one_line_error(serve_cli("--api-key-file", str(empty)), "the first line (the API key) is empty")
    one_line_error(serve_cli("--api-key-file", str(tmp_path / "missing")), "cannot read the API key")
