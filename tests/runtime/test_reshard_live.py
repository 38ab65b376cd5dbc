"""Live reshard on 4 gloo ranks (2 nodes x 2) behind a real HTTP server: answers identical before,
during and after; requests during the reshard all succeed; injected faults roll back.
MOEPLACE_TEST_DEVICE=cuda runs the same on NCCL (tests/support/reshard_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from reshard_server import (RANKS, Load, answers, faulty_server, job_counts, live_phy2log, placement_for,
                            submit, wait_job)

from moeplace.placement import load_placement, placement_to_json
from moeplace.placer.solve import Method
from moeplace.readers import load_trace
from moeplace.runtime.tiny import default_model_dir

# first job: a byte corrupted in layer 2's transfers; second: the last rank fails while staging layer 3;
# third: a second's wait before layer 1, so a request meanwhile surely finds it running.
FAULTS = f"corrupt:2,fail:3:{RANKS - 1},slow:1"


@pytest.fixture(scope="module")
def server(tmp_path_factory, running_server, free_port):
    root = tmp_path_factory.mktemp("reshard")
    os.environ["MOEPLACE_CACHE"] = str(root / "cache")
    default_model_dir()
    old = placement_for([0, 1, 2], Method.greedy, root / "old.json")
    new = placement_for([3, 4, 5], Method.cpsat, root / "new.json")
    port = free_port()
    command, config_env = faulty_server(old, port, FAULTS)
    env = dict(os.environ, OMP_NUM_THREADS="1", **config_env)
    with running_server(command, env, root / "serve.log", port) as (url, _):
        yield {"url": url, "old": old, "new": new, "log": root / "serve.log"}


def test_faults_roll_back_then_reshard_goes_live(server):
    url = server["url"]
    before = answers(url)
    old = load_placement(server["old"]).phy2log_LP
    assert np.array_equal(live_phy2log(url), old)

    # 1. a corrupted byte in layer 2 (after layer 1 was swapped): checksum -> every layer back to old
    for expected in ("checksum mismatch", f"injected failure on rank {RANKS - 1}"):
        r = submit(url, server["new"])
        assert r.status_code == 202, r.text
        status = wait_job(url, r.json()["id"])
        assert status["state"] == "rolled_back", status
        assert expected in status["error"]
        assert np.array_equal(live_phy2log(url), old)
        assert answers(url) == before

    # 2. no fault left: the new layout goes live while requests keep coming
    with Load(url) as load:
        time.sleep(0.5)
        r = submit(url, server["new"])
        assert r.status_code == 202, r.text
        busy = submit(url, server["new"])
        status = wait_job(url, r.json()["id"])
        time.sleep(0.5)
    assert busy.status_code == 409 and "still running" in busy.json()["error"]
    assert status["state"] == "done", status
    assert status["layers_done"] == 3 and status["experts_moved"] == status["experts_to_move"] > 0
    phases = status["phase_seconds"]  # where the time went, for tuning
    assert set(phases) == {"stage", "post", "transfer", "check", "swap_wait"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= status["seconds"]
    assert [set(p) for p in status["rank_phase_seconds"]] == [set(phases)] * RANKS, status
    assert np.array_equal(live_phy2log(url), load_placement(server["new"]).phy2log_LP)
    assert load.sent > 0 and load.failed == 0
    assert all(len(texts) == 1 for texts in load.texts.values()), load.texts  # same answer during the reshard
    assert answers(url) == before
    text = httpx.get(f"{url}/metrics").text
    assert 'moeplace_reshard_jobs{state="rolled_back"} 2.0' in text and 'moeplace_reshard_jobs{state="done"} 1.0' in text


@pytest.mark.parametrize("mutate, status, fragment", [
    (lambda d: d.update(phy2log=[[0] * 72] * 3), 400, "no replica of expert 1"),
    (lambda d: d["topology"].update(num_gpus=8 // RANKS, slots_per_gpu=72 * RANKS // 8), 400, str(RANKS)),
    (lambda d: d.update(layers=[0, 1, 2]), 400, "not the MoE layers"),
    (lambda d: d.update(format="nope"), 400, "format"),
])
def test_bad_placements_are_refused_before_any_byte_moves(server, mutate, status, fragment):
    body = json.loads(placement_to_json(load_placement(server["new"])))
    mutate(body)
    before = live_phy2log(server["url"])
    r = httpx.put(f"{server['url']}/moeplace/placement", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert np.array_equal(live_phy2log(server["url"]), before)


def test_not_json_and_unknown_job(server):
    r = httpx.put(f"{server['url']}/moeplace/placement", content=b"{nope", timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{server['url']}/moeplace/reshard/unknown").status_code == 404


def test_profile_and_apply_cli(server, tmp_path):
    """`moeplace profile` records a trace from the live server; `moeplace apply` makes a placement live."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "moeplace.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env=dict(os.environ, COLUMNS="200"))
    with Load(server["url"]):
        trace_path = tmp_path / "live.safetensors"
        done = run("profile", "--url", server["url"], "--duration", "2", "--window-seconds", "0.5", "-o", str(trace_path))
        assert done.returncode == 0, done.stderr
        trace = load_trace(trace_path)
        assert trace.layers.tolist() == [1, 2, 3] and trace.counts_WLE.sum() > 0
        # top-8: every token a step routes is counted 8 times in every MoE layer
        assert (trace.counts_WLE.sum(axis=2) == trace.tokens_W[:, None] * 8).all()
        done = run("apply", str(server["old"]), "--url", server["url"])
        assert done.returncode == 0, done.stderr
        assert "experts moved" in done.stdout
        assert [f"time on rank {r}: stage" in done.stdout for r in range(RANKS)] == [True] * RANKS, done.stdout
    assert np.array_equal(live_phy2log(server["url"]), load_placement(server["old"]).phy2log_LP)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = run("apply", str(bad), "--url", server["url"])
    assert done.returncode == 1 and "Traceback" not in done.stderr and "format" in done.stderr
    done = run("apply", str(server["old"]), "--url", "http://127.0.0.1:9")
    assert done.returncode == 1 and "cannot reach the server" in done.stderr


def test_client_disconnecting_during_apply_changes_nothing(server):
    """The reshard runs on the server: killing `moeplace apply` mid-way neither stops nor breaks it."""
    url = server["url"]
    target = load_placement(server["new"])
    assert not np.array_equal(live_phy2log(url), target.phy2log_LP)
    done_before = job_counts(url).get("done", 0)
    client = subprocess.Popen([sys.executable, "-m", "moeplace.cli", "apply", str(server["new"]), "--url", url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the server has the job: then the client goes away
        jobs = job_counts(url)
        if jobs.get("running", 0) + jobs.get("pending", 0) > 0 or jobs.get("done", 0) > done_before:
            break
        time.sleep(0.05)
    client.kill()
    client.wait(timeout=30)
    deadline = time.monotonic() + 120
    while job_counts(url).get("done", 0) <= done_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_counts(url).get("done", 0) == done_before + 1
    assert np.array_equal(live_phy2log(url), target.phy2log_LP)
    assert answers(url)  # still serving


def _recorded_counts(url: str, path) -> np.ndarray:
    """Stop the recording and sum the dumped trace's windows: [L, E]."""
    assert httpx.post(f"{url}/moeplace/profile/stop", timeout=60).status_code == 200
    r = httpx.get(f"{url}/moeplace/profile/dump", timeout=60)
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return load_trace(path).counts_WLE.sum(axis=0)


def test_counts_recorded_across_a_reshard_are_exact(server, tmp_path):
    """A layer swap between two collects: the window's per-slot counts so far are folded to logical
    experts under the old layout first, so a recording that spans a reshard counts exactly what the
    same requests count with no reshard (each request's routing does not depend on its batch)."""
    url = server["url"]
    start = lambda: httpx.post(f"{url}/moeplace/profile/start", json={"window_seconds": 60}, timeout=60)  # noqa: E731
    assert start().status_code == 200
    answers(url)
    once = _recorded_counts(url, tmp_path / "once.safetensors")
    assert once.sum() > 0
    target = server["old"] if not np.array_equal(live_phy2log(url), load_placement(server["old"]).phy2log_LP) \
        else server["new"]
    assert start().status_code == 200
    r = submit(url, target)
    assert r.status_code == 202, r.text
    rounds = 0
    while True:  # at least one round: on a fast machine the reshard may be done before the first poll
        answers(url)
        rounds += 1
        if httpx.get(f"{url}/moeplace/reshard/{r.json()['id']}").json()["state"] not in ("pending", "running"):
            break
    answers(url)
    status = wait_job(url, r.json()["id"])
    assert status["state"] == "done", status
    assert np.array_equal(live_phy2log(url), load_placement(target).phy2log_LP)
    assert rounds > 0 and np.array_equal(_recorded_counts(url, tmp_path / "during.safetensors"), (rounds + 1) * once)
