"""record_sglang's errors against the fake SGLang server (tests/support/fake_sglang.py): unreachable and
failing servers, missing and malformed dump files, each one clear message and nothing written."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.responses import JSONResponse, PlainTextResponse

from fake_sglang import per_token_dump, redundant_map
from moeplace.profiler.sglang import record_sglang


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
