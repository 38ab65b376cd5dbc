"""record_sglang against a real HTTP server speaking SGLang's expert-distribution API.

SGLang itself needs a GPU, so the server here is a FastAPI app on 127.0.0.1 that answers the three
recorder endpoints the way sgl-project/sglang `http_server.py` does (GET and POST, 200 with one line of
plain text, JSON errors, Bearer API key) and on dump `torch.save`s files in SGLang's formats and names into
a folder, per-rank files of per_token mode arriving late like those of ranks that do not answer HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from http_fixture import serving
from moeplace.profiler.sglang import record_sglang
from moeplace.sglang_dump import read_sglang_rank_dumps

ENDPOINTS = {
    "/start_expert_distribution_record": "Start recording the expert distribution.\n",
    "/stop_expert_distribution_record": "Stop recording the expert distribution.\n",
    "/dump_expert_distribution_record": "Dump expert distribution record.\n",
}
LATE_RANK_SECONDS = 0.2


class FakeSGLang:
    """What the fake server answers and what its dump writes; tests set the fields."""

    def __init__(self) -> None:
        self.configure(Path("/nonexistent"))

    def configure(self, folder: Path, mode: str | None = "stat", tp_size: int = 1, dump=None) -> None:
        self.folder, self.mode, self.tp_size = folder, mode, tp_size
        self.dump = dump or {}  # {rank: object to torch.save}; a rank of None = the stat file (no rank suffix)
        self.raw: bytes | None = None  # written as the stat file instead, when set
        self.fail: dict[str, Response] = {}
        self.api_key: str | None = None
        self.admin_api_key: str | None = None  # SGLang 0.5.23's --admin-api-key
        self.buffer_size: int | None = None  # --expert-distribution-recorder-buffer-size in the server info
        self.calls: list[tuple[str, str, int]] = []

    def write_dump(self) -> None:
        def save(rank, obj):
            suffix = "" if rank is None else f"_{rank}"
            torch.save(obj, self.folder / f"expert_distribution_recorder_{time.time()}{suffix}.pt")

        if self.raw is not None:
            (self.folder / f"expert_distribution_recorder_{time.time()}.pt").write_bytes(self.raw)
        for rank, obj in self.dump.items():
            if rank:  # ranks other than 0 finish after the HTTP answer
                threading.Timer(LATE_RANK_SECONDS, save, (rank, obj)).start()
            else:
                save(rank, obj)


def sglang_app(state: FakeSGLang) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def log_and_authenticate(request: Request, call_next):
        # SGLang 0.5.23's rules (utils/auth.py): the recorder routes are "admin optional" (the admin key
        # when set, else the API key); the rest, /server_info included, want the API key when set.
        if request.url.path in ENDPOINTS:
            key = state.admin_api_key or state.api_key
        else:
            key = state.api_key
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            response = JSONResponse({"error": "Unauthorized"}, status_code=401)
        else:
            response = await call_next(request)
        state.calls.append((request.method, request.url.path, response.status_code))
        return response

    # Older SGLang: /get_server_info only (newer ones add /server_info), so the client's fallback runs.
    @app.get("/get_server_info")
    async def get_server_info():
        info = {"model_path": "deepseek-ai/DeepSeek-V3", "tp_size": state.tp_size, "dp_size": 1, "ep_size": state.tp_size,
                "expert_distribution_recorder_mode": state.mode, "internal_states": [{}], "version": "fake"}
        if state.buffer_size is not None:
            info["expert_distribution_recorder_buffer_size"] = state.buffer_size
        return info

    def endpoint(path: str, text: str):
        def handle():
            if path in state.fail:
                return state.fail[path]
            if path == "/dump_expert_distribution_record":
                state.write_dump()
            return Response(content=text, status_code=200)

        app.api_route(path, methods=["GET", "POST"])(handle)

    for path, text in ENDPOINTS.items():
        endpoint(path, text)
    return app


@pytest.fixture(scope="module")
def server():
    state = FakeSGLang()
    with serving(sglang_app(state)) as url:
        yield state, url


@pytest.fixture
def sglang(server, tmp_path):
    state, url = server
    state.configure(tmp_path)
    return state, url


def stat_dump(rng: np.random.Generator, steps: int = 3) -> dict:
    """SGLang stat dump of DeepSeek-V3: logical_count int32 [steps, 61, 256], dense layers 0..2 zero."""
    counts = rng.integers(0, 100, size=(steps, 61, 256)).astype(np.int32)
    counts[:, :3] = 0
    return {"rank": 0, "logical_count": torch.from_numpy(counts), "average_utilization_rate_over_window": None}


def per_token_dump(rng: np.random.Generator, rank: int, p2l_RP: np.ndarray, passes: int = 3, top_k: int = 2) -> dict:
    """SGLang per_token dump of one rank: physical top-k ids [R, T, 8] (-1 padded, row 0 dense) and their counts."""
    R, P = p2l_RP.shape
    records = []
    for pass_id in range(passes):
        T = int(rng.integers(1, 6))
        ids = np.full((R, T, 8), -1, dtype=np.int32)
        for r in range(1, R):
            for t in range(T):
                slots = rng.choice(P, size=top_k, replace=False)
                while len(set(p2l_RP[r, slots])) < top_k:  # a token picks distinct logical experts
                    slots = rng.choice(P, size=top_k, replace=False)
                ids[r, t, :top_k] = slots
        physical_RP = np.stack([np.bincount(ids[r][ids[r] >= 0], minlength=P) for r in range(R)]).astype(np.int32)
        records.append(dict(forward_pass_id=100 + pass_id, rank=rank, gatherer_key="primary",
                            input_ids=rng.integers(0, 1000, T).tolist(), positions=list(range(T)),
                            extend_seq_lens=[T], forward_mode=1, misc_objects=[],
                            topk_ids_of_layer=torch.from_numpy(ids), global_physical_count=torch.from_numpy(physical_RP)))
    return {"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l_RP)}


def logical_counts(dumps: list[dict], p2l_RP: np.ndarray, num_experts: int) -> np.ndarray:
    """Expected [passes, R, E] from the per-token ids the server wrote, computed without the client."""
    R = p2l_RP.shape[0]
    out = []
    for records in zip(*(d["records"] for d in dumps)):
        counts = np.zeros((R, num_experts))
        for record in records:
            ids = record["topk_ids_of_layer"].numpy()
            for r in range(R):
                used = ids[r][ids[r] >= 0]
                counts[r] += np.bincount(p2l_RP[r, used], minlength=num_experts)
        out.append(counts)
    return np.stack(out)


def redundant_map(rng: np.random.Generator, R: int = 4, E: int = 8, P: int = 10) -> np.ndarray:
    return np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, P - E)]) for _ in range(R)])


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


def test_unreachable_url(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(ValueError, match=rf"http://127.0.0.1:{port}/server_info: cannot reach the server"):
        record_sglang(f"http://127.0.0.1:{port}", 0, dump_dir=tmp_path, timeout=2)
    with pytest.raises(ValueError, match=r"must start with http://"):
        record_sglang(f"127.0.0.1:{port}", 0, dump_dir=tmp_path)


@pytest.mark.parametrize("path, response, reason", [
    ("/dump_expert_distribution_record",
     JSONResponse({"object": "error", "message": "recorder failed", "type": "500", "param": None, "code": 500}, 500),
     "recorder failed"),
    ("/start_expert_distribution_record", PlainTextResponse("Internal Server Error", 500), "Internal Server Error"),
])
def test_server_errors_name_url_and_reason(sglang, path, response, reason):
    state, url = sglang
    state.fail = {path: response}
    with pytest.raises(ValueError, match=rf"^{url}{path}: HTTP 500: {reason}$"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=5)
    if path.startswith("/start"):
        assert ("POST", "/stop_expert_distribution_record", 200) not in state.calls
    assert list(state.folder.iterdir()) == []


def test_server_without_recorder_mode_is_refused_before_start(sglang):
    state, url = sglang
    state.mode = None
    with pytest.raises(ValueError, match=r"without --expert-distribution-recorder-mode"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=5)
    assert [path for _, path, _ in state.calls] == ["/server_info", "/get_server_info"]


def test_no_dump_file(sglang):
    state, url = sglang
    with pytest.raises(ValueError, match=rf"^{url}: no dump file expert_distribution_recorder_\*\.pt appeared in {state.folder}"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=0.3)


def test_missing_rank_file(sglang):
    state, url = sglang
    rng = np.random.default_rng(5)
    state.configure(state.folder, mode="per_token", tp_size=2, dump={0: per_token_dump(rng, 0, redundant_map(rng))})
    with pytest.raises(ValueError, match=r"only ranks \[0\] of the 2 tensor-parallel ranks wrote a dump file"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=0.3)


class Payload:
    """Pickles as a call to open(marker, "w"): run only by an unpickler that executes arbitrary globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("content, message", [
    ("payload", r"refused: it pickles io\.open"),
    ({"rank": 0, "logical_count": torch.zeros(2, 61, 256, dtype=torch.int32)}, r"all 61 layer rows are zero"),
    ({"rank": 0, "counts": torch.ones(2, 61, 256)}, r"key 'logical_count' is missing"),
    (b"not a zip file", r"not a readable torch file"),
])
def test_malformed_dump_is_refused(sglang, tmp_path_factory, content, message):
    state, url = sglang
    marker = tmp_path_factory.mktemp("marker") / "executed"
    if isinstance(content, bytes):
        state.raw = content
    else:
        state.dump = {None: Payload(marker) if content == "payload" else content}
    with pytest.raises(ValueError, match=rf"{state.folder}/expert_distribution_recorder_[0-9.]+\.pt: {message}"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=5)
    assert not marker.exists()
    assert len(list(state.folder.iterdir())) == 1  # the server's file only; the client wrote nothing


def test_idle_server_per_token_dump(sglang):
    state, url = sglang
    empty = {"records": [], "last_physical_to_logical_map": torch.from_numpy(redundant_map(np.random.default_rng(6)))}
    state.configure(state.folder, mode="per_token", dump={0: empty})
    with pytest.raises(ValueError, match=r"the dump holds no forward passes"):
        record_sglang(url, 0, dump_dir=state.folder, timeout=5)


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
