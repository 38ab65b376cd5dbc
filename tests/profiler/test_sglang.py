"""record_sglang against a real HTTP server speaking SGLang's expert-distribution API (the fake server of
tests/support/fake_sglang.py): stat, per_token and per_pass dumps, API keys, interruption, a full ring.
Its errors are tested in test_sglang_errors.py."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from fake_sglang import logical_counts, per_token_dump, redundant_map, stat_dump
from moeplace.profiler.sglang import record_sglang
from moeplace.sglang_dump import read_sglang_rank_dumps


def test_stat_dump_is_read_and_older_dumps_ignored(sglang):
    state, url = sglang
    rng = np.random.default_rng(0)
    torch.save(stat_dump(rng), state.folder / "expert_distribution_recorder_1700000000.0.pt")  # an earlier recording
    written = stat_dump(rng)
    state.dump = {None: written}
    trace = record_sglang(url, 0.05, dump_dir=state.folder, timeout=5)
    np.testing.assert_array_equal(trace.counts_WLE, written["logical_count"].numpy()[:, 3:])
    assert trace.layers.tolist() == list(range(3, 61))
    assert (trace.top_k, trace.n_group, trace.topk_group) == (8, 8, 4)
    meta = trace.metadata
    assert (meta["engine"], meta["url"], meta["recorder_mode"], meta["model"]) == ("sglang", url, "stat", "deepseek-ai/DeepSeek-V3")
    assert meta["recorded_from"] < meta["recorded_until"] and float(meta["duration_s"]) >= 0.05
    assert meta["dump_files"] != "expert_distribution_recorder_1700000000.0.pt"
    assert state.calls == [
        ("GET", "/server_info", 404),
        ("GET", "/get_server_info", 200),
        ("POST", "/start_expert_distribution_record", 200),
        ("POST", "/stop_expert_distribution_record", 200),
        ("POST", "/dump_expert_distribution_record", 200),
    ]


def test_per_token_ranks_are_merged_per_forward_pass(sglang):
    state, url = sglang
    rng = np.random.default_rng(1)
    p2l_RP = redundant_map(rng)
    dumps = [per_token_dump(rng, rank, p2l_RP) for rank in range(2)]  # two ranks, distinct tokens (DP attention)
    state.configure(state.folder, mode="per_token", tp_size=2, dump=dict(enumerate(dumps)))
    trace = record_sglang(url, 0.05, dump_dir=state.folder, timeout=5)
    expected = logical_counts(dumps, p2l_RP, 8)
    np.testing.assert_array_equal(trace.counts_WLE, expected[:, 1:])  # layer 0 is dense: no selections
    assert trace.layers.tolist() == [1, 2, 3] and trace.top_k == 2
    tokens = [sum(len(d["records"][w]["input_ids"]) for d in dumps) for w in range(3)]
    assert trace.tokens_W.tolist() == tokens
    assert trace.topk_ids_TLK.shape == (sum(tokens), 3, 2)
    # the sampled selections, folded to logical experts, add up to the same counts
    ids = trace.topk_ids_TLK
    assert np.array_equal(np.stack([np.bincount(ids[:, l].ravel(), minlength=8) for l in range(3)]),
                          expected.sum(axis=0)[1:])
    assert trace.metadata["window_names"] == '["100", "101", "102"]'
    assert trace.metadata["ranks"] == "2" and trace.metadata["recorder_mode"] == "per_token"


def test_identical_ranks_are_counted_once(tmp_path):
    rng = np.random.default_rng(2)
    p2l_RP = redundant_map(rng)
    dump = per_token_dump(rng, 0, p2l_RP)
    for rank in range(2):  # tensor-parallel MoE: every rank routed the same tokens
        torch.save(dump, tmp_path / f"expert_distribution_recorder_1.0_{rank}.pt")
    trace = read_sglang_rank_dumps(sorted(tmp_path.iterdir()))
    np.testing.assert_array_equal(trace.counts_WLE, logical_counts([dump], p2l_RP, 8)[:, 1:])
    assert "identical records" in trace.metadata["notes"]


def test_per_pass_dump_without_token_ids(sglang):
    state, url = sglang
    rng = np.random.default_rng(3)
    p2l_RP = redundant_map(rng)
    dump = per_token_dump(rng, 0, p2l_RP)
    for record in dump["records"]:
        for key in ("input_ids", "positions", "extend_seq_lens", "forward_mode", "misc_objects", "topk_ids_of_layer"):
            del record[key]
    state.configure(state.folder, mode="per_pass", dump={0: dump})
    trace = record_sglang(url, 0, dump_dir=state.folder, timeout=5, top_k=2)
    expected = np.stack([[np.bincount(p2l_RP[r], weights=rec["global_physical_count"][r].numpy(), minlength=8)
                          for r in range(4)] for rec in dump["records"]])
    np.testing.assert_array_equal(trace.counts_WLE, expected[:, 1:])
    assert trace.topk_ids_TLK is None and trace.tokens_W is None


def test_api_key(sglang):
    state, url = sglang
    state.dump, state.api_key = {None: stat_dump(np.random.default_rng(4))}, "secret"
    with pytest.raises(ValueError, match=r"/server_info: HTTP 401: Unauthorized"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=5)
    assert record_sglang(url, 0, dump_dir=state.folder, timeout=5, api_key="secret").num_windows == 3


def test_interrupted_recording_is_stopped(sglang, monkeypatch):
    state, url = sglang

    def interrupt(seconds):
        raise KeyboardInterrupt

    clock = types.SimpleNamespace(sleep=interrupt, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr("moeplace.profiler.sglang.time", clock)  # this module's clock only, not the server's
    with pytest.raises(KeyboardInterrupt):
        record_sglang(url, 60, dump_dir=state.folder, timeout=5)
    assert [path for _, path, _ in state.calls][-2:] == ["/start_expert_distribution_record", "/stop_expert_distribution_record"]


def test_api_key_and_admin_api_key_each_where_sglang_wants_it(sglang):
    state, url = sglang
    state.api_key, state.admin_api_key = "user-key", "admin-key"
    state.dump = {None: stat_dump(np.random.default_rng(5))}
    trace = record_sglang(url, 0.01, dump_dir=state.folder, timeout=5, api_key="user-key", admin_api_key="admin-key")
    assert trace.num_windows == 3
    assert [c[2] for c in state.calls] == [404, 200, 200, 200, 200]  # /server_info is older SGLang's 404
    with pytest.raises(ValueError, match="start_expert_distribution_record: HTTP 401: Unauthorized"):
        record_sglang(url, 0.01, dump_dir=state.folder, timeout=5, api_key="user-key")  # no admin key


def test_admin_api_key_alone_unlocks_the_recorder(sglang):
    state, url = sglang
    state.admin_api_key = "admin-key"
    state.dump = {None: stat_dump(np.random.default_rng(6))}
    assert record_sglang(url, 0.01, dump_dir=state.folder, timeout=5, admin_api_key="admin-key").num_windows == 3


@pytest.mark.parametrize("buffer_size, warned", [(3, True), (5, False), (-1, False)])
def test_a_full_recorder_ring_is_reported(sglang, buffer_size, warned):
    state, url = sglang
    state.buffer_size = buffer_size
    dump = stat_dump(np.random.default_rng(7), steps=5 if buffer_size == 5 else 3)
    if buffer_size == 5:
        dump["logical_count"][3:] = 0  # two steps of the ring never written
    state.dump = {None: dump}
    trace = record_sglang(url, 0.01, dump_dir=state.folder, timeout=5)
    assert trace.num_windows == 3
    if warned:
        assert "ring was full" in trace.metadata["warnings"] and "last 3 forward passes" in trace.metadata["warnings"]
    else:
        assert "warnings" not in trace.metadata
