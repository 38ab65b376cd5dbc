"""`moeplace serve` end to end: torchrun with 2 gloo ranks, a real HTTP server on loopback, a solved
placement with redundant replicas, answers compared with a single-process model."""

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
from moeplace.runtime.tiny import default_model_dir
from moeplace.runtime.tokenizer import ByteTokenizer
from moeplace.topology import Topology
from moeplace.trace import Trace

PROMPTS = ["The expert route of the token", "GPU memory is fast", "def balance(load):"]


def solved_placement(path: Path) -> Path:
    """A CP-SAT placement for 2 ranks x 36 slots (8 redundant) from the OLMoE counts the tiny model follows."""
    olmoe = load_trace(EXAMPLE_TRACE)
    trace = Trace(olmoe.counts_WLE, np.array([1, 2, 3]), 8, num_model_layers=4, n_group=8, topk_group=4,
                  source="olmoe-on-tiny")
    result = solve([trace], Topology(2, 1, 36), SolveOptions(method=Method.cpsat, time_limit=2, workers=1))
    assert (result.placement.replica_count_LE > 1).any()
    save_placement(result.placement, path)
    return path


def greedy_reference(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """Single process, trivial placement, one sequence at a time."""
    tok = ByteTokenizer()
    model = EPModel.load(model_dir, None, group=None, device=torch.device("cpu"))
    (out,) = greedy_continue(model, [tok.encode(prompt)], max_tokens, tok.pad_id)
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


@pytest.fixture(scope="module")
def server(tmp_path_factory, running_server, free_port):
    root = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, MOEPLACE_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    os.environ["MOEPLACE_CACHE"] = env["MOEPLACE_CACHE"]
    model_dir = default_model_dir()
    placement = solved_placement(root / "placement.json")
    port = free_port()
    cmd = [sys.executable, "-m", "moeplace.cli", "serve", "--nproc", "2", "--gpus-per-node", "1",
           "--placement", str(placement), "--port", str(port), "--max-batch", "4"]
    with running_server(cmd, env, root / "serve.log", port) as (url, _):
        yield {"url": url, "model_dir": model_dir, "placement": placement}


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

def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeplace.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, COLUMNS="200"))


def one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    text = " ".join(done.stderr.split())
    for fragment in fragments:
        assert fragment in text, text


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
