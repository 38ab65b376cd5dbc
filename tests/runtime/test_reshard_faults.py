"""A transfer that times out mid-reshard, on 4 gloo ranks (2 nodes x 2) behind a real HTTP server:
rank 1 posts its layer-2 transfers twice the timeout late, its peers' waits time out, every rank
agrees and layer 1 (already swapped) moves back, while requests keep coming, all answered as before;
the next reshard goes live. MOEPLACE_TEST_DEVICE=cuda runs it on NCCL (tests/support/reshard_server.py)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from reshard_server import (PROMPTS, Load, answers, faulty_server, job_counts, live_phy2log, placement_for,
                            submit, wait_job)

from moeplace.placement import load_placement
from moeplace.placer.solve import Method
from moeplace.runtime.reshard_options import ReshardOptions
from moeplace.runtime.reshard_plan import plan_reshard

TIMEOUT_S = 2  # MOEPLACE_RESHARD_TIMEOUT of the server: short, so the stalled job takes seconds
STALLED_LAYER, STALLED_RANK = 2, 1
FAULT = f"stall:{STALLED_LAYER}:{STALLED_RANK}"  # the first job only


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory, running_server, free_port):
    root = tmp_path_factory.mktemp("reshard-faults")
    old = placement_for([0, 1, 2], Method.greedy, root / "old.json")
    new = placement_for([3, 4, 5], Method.greedy, root / "new.json")
    port = free_port()
    command, config_env = faulty_server(old, port, FAULT, model=tiny_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEPLACE_RESHARD_TIMEOUT=str(TIMEOUT_S), **config_env)
    with running_server(command, env, root / "serve.log", port) as (url, _):
        yield SimpleNamespace(url=url, old=old, new=new)


def reshard_under_load(url: str, placement) -> tuple[dict, Load, float]:
    """Submit `placement` while requests keep coming; (final job status, the load, seconds to finish)."""
    with Load(url) as load:
        time.sleep(0.5)
        start = time.monotonic()
        r = submit(url, placement)
        assert r.status_code == 202, r.text
        status = wait_job(url, r.json()["id"])
        seconds = time.monotonic() - start
        time.sleep(0.5)
    return status, load, seconds


def test_transfer_timeout_rolls_back_then_reshard_goes_live(server):
    url = server.url
    old, new = load_placement(server.old), load_placement(server.new)
    plan = plan_reshard(old, new)
    row = plan.layers.tolist().index(STALLED_LAYER)
    # The premise: the stalled rank has transfers in that layer, and an earlier layer swaps before it.
    assert len(plan.sends_of(STALLED_RANK, row).peer_X) + len(plan.receives_of(STALLED_RANK, row).peer_X) > 0
    assert plan.experts_moved_L[:row].sum() > 0
    before = answers(url)
    expected = {prompt: {text} for prompt, text in zip(PROMPTS, before)}

    # 1. the stalled transfer times out on its peers: every rank rolls back, the old layout serves throughout
    status, load, seconds = reshard_under_load(url, server.new)
    assert status["state"] == "rolled_back", status
    assert f"layer {STALLED_LAYER}: " in status["error"], status
    assert status["error"].endswith(f"transfer timed out after {TIMEOUT_S} s waiting on rank {STALLED_RANK}"), status
    assert seconds >= 2 * TIMEOUT_S  # the late transfers were waited out, not abandoned
    assert load.sent > 0 and load.failed == 0
    assert all(texts == expected[prompt] for prompt, texts in load.texts.items()), (load.texts, before)
    assert np.array_equal(live_phy2log(url), old.phy2log_LP)
    assert answers(url) == before
    assert job_counts(url)["rolled_back"] == 1

    # 2. no fault left: the same group moves every layer, and the new layout goes live
    status, load, _ = reshard_under_load(url, server.new)
    assert status["state"] == "done", status
    assert status["experts_moved"] == status["experts_to_move"] > 0
    assert np.array_equal(live_phy2log(url), new.phy2log_LP)
    assert load.sent > 0 and load.failed == 0
    assert all(texts == expected[prompt] for prompt, texts in load.texts.items()), (load.texts, before)
    assert answers(url) == before
    counts = job_counts(url)
    assert counts["rolled_back"] == 1 and counts["done"] == 1, counts


@pytest.mark.parametrize("raw", ["0", "-2", "nan", "inf", "2s"])
def test_bad_timeout_is_one_clear_error(raw):
    with pytest.raises(ValueError, match=f"MOEPLACE_RESHARD_TIMEOUT must be a positive number of seconds, got '{raw}'"):
        ReshardOptions.from_env({"MOEPLACE_RESHARD_TIMEOUT": raw})


def test_a_crashed_reshard_thread_stops_the_server(tiny_dir, tmp_path, running_server, free_port):
    """A reshard thread that dies outside the agreement (a bug) must not leave a server serving on with a
    job that never ends: every rank stops, the launcher exits non-zero, the job was marked failed."""
    old = placement_for([0, 1, 2], Method.greedy, tmp_path / "old.json")
    new = placement_for([3, 4, 5], Method.greedy, tmp_path / "new.json")
    port = free_port()
    command, config_env = faulty_server(old, port, f"crash:{STALLED_LAYER}:{STALLED_RANK}", model=tiny_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", **config_env)
    with running_server(command, env, tmp_path / "serve.log", port) as (url, proc):
        with Load(url) as load:
            time.sleep(0.5)
            r = submit(url, new)
            assert r.status_code == 202, r.text
            code = proc.wait(timeout=120)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid):  # no rank left behind the launcher
            assert time.monotonic() < deadline, "ranks still running after the launcher exited"
            time.sleep(0.2)
    assert code != 0
    log = (tmp_path / "serve.log").read_text()
    assert f"the reshard thread of rank {STALLED_RANK} failed" in log and "injected crash" in log, log[-3000:]
    assert load.sent > 0  # requests in flight got an error or an answer; none hangs (Load joined its threads)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
