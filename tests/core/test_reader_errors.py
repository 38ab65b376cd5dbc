"""Trace readers and bad input: every malformed file gets one clear error naming the file and the
problem, and nothing in a file is executed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from trace_files import per_token_dump, raises_for, write_trtllm

from moeplace.readers import load_trace


def write_json(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not JSON"),
        ('[1, 2]', "expected a dict"),
        ('{"counts": [[1]]}', "key 'logical_count' is missing"),
        ('{"logical_count": [1, 2, 3]}', r"'logical_count' must be \[layers, experts\]"),
        ('{"logical_count": [[[[1]]]]}', r"'logical_count' must be \[layers, experts\]"),
        ('{"logical_count": [[1, 2], [3]]}', "'logical_count' is ragged"),
        ('{"logical_count": [[1, NaN], [3, 4]]}', "'logical_count' holds nan at index .*NaN/inf"),
        ('{"logical_count": [[1, Infinity], [3, 4]]}', "'logical_count' holds inf"),
        ('{"logical_count": [[1, -2], [3, 4]]}', "'logical_count' holds negative count -2"),
        ('{"logical_count": [["a", "b"]]}', "'logical_count' must hold numbers"),
        ('{"logical_count": [[0, 0], [0, 0]]}', "all 2 layer rows are zero"),
        ('{"logical_count": [[5, 1], [3, 4]]}', "pass top_k"),
    ],
)
def test_bad_sglang_json(tmp_path, text, problem):
    path = write_json(tmp_path, "dump.json", text)
    with raises_for(path, problem):
        load_trace(path)


def test_missing_file(tmp_path):
    with raises_for(tmp_path / "missing.json", "file not found"):
        load_trace(tmp_path / "missing.json")


def test_unknown_extension(tmp_path):
    path = write_json(tmp_path, "trace.csv", "layer,expert,count\n")
    with raises_for(path, "unknown trace format '.csv'"):
        load_trace(path)


def test_zero_layers(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "empty.pt"
    torch.save({"logical_count": torch.zeros(2, 0, 8)}, path)
    with raises_for(path, r"empty, shape \[2, 0, 8\]"):
        load_trace(path)


def test_safetensors_without_moeplace_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path))
    with raises_for(path, "without moeplace trace metadata"):
        load_trace(path)


def test_trtllm_rank_file_alone_points_to_its_folder(tmp_path):
    write_trtllm(tmp_path / "stat", np.ones((1, 1, 1, 8), dtype=np.int64), [0], [3], 2)
    path = tmp_path / "stat" / "rank0.safetensors"
    with raises_for(path, "pass its folder"):
        load_trace(path)


def test_pt_of_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 not a torch file")
    with raises_for(path, "not a readable torch file"):
        load_trace(path)


class _Payload:
    """Pickles as a call to open(marker, "w"): the file appears only if unpickling runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pt_with_pickled_object_is_refused_not_executed(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"logical_count": _Payload(marker)}, path)
    with raises_for(path, "refused: it pickles"):
        load_trace(path)
    assert not marker.exists()


def test_pt_holding_a_bare_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(61, 256), path)
    with raises_for(path, "expected a dict with key 'logical_count'"):
        load_trace(path)


def test_per_token_dump_without_slot_map(tmp_path):
    torch = pytest.importorskip("torch")
    dump, _ = per_token_dump([2])
    del dump["last_physical_to_logical_map"]
    path = tmp_path / "no_map.pt"
    torch.save(dump, path)
    with raises_for(path, "'last_physical_to_logical_map' is missing"):
        load_trace(path)


def test_per_token_ids_outside_the_slots(tmp_path):
    torch = pytest.importorskip("torch")
    dump, _ = per_token_dump([2])
    dump["records"][0]["topk_ids_of_layer"][1, 0, 0] = 99
    path = tmp_path / "bad_ids.pt"
    torch.save(dump, path)
    with raises_for(path, r"records\[0\].topk_ids_of_layer' holds 99"):
        load_trace(path)


def test_trtllm_folder_without_meta_info(tmp_path):
    with raises_for(tmp_path, "no meta_info.json"):
        load_trace(tmp_path)


@pytest.mark.parametrize(
    ("meta", "tensors", "problem"),
    [
        ({"num_experts_per_token": 2}, {"0_3": np.ones(8, np.int64)}, "'num_experts' must be a positive integer"),
        ({"num_experts": 8, "num_experts_per_token": 2}, {"0-3": np.ones(8, np.int64)}, "'0-3' is not named"),
        ({"num_experts": 8, "num_experts_per_token": 2}, {"0_3": np.ones(5, np.int64)}, "'0_3' has shape \\[5\\]"),
        ({"num_experts": 8, "num_experts_per_token": 2}, {"0_3": -np.ones(8, np.int64)}, "'0_3' holds negative"),
        (
            {"num_experts": 8, "num_experts_per_token": 2},
            {"0_3": np.ones(8, np.int64), "1_4": np.ones(8, np.int64)},
            "no rank file holds tensor '0_4'",
        ),
    ],
)
def test_bad_trtllm_folder(tmp_path, meta, tensors, problem):
    (tmp_path / "meta_info.json").write_text(json.dumps(meta))
    save_file(tensors, str(tmp_path / "rank0.safetensors"))
    with raises_for(tmp_path, problem):
        load_trace(tmp_path)


# ---------------------------------------------------------------- TensorRT-LLM with its load balancer
