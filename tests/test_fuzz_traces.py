"""Every trace file moeplace reads, fuzzed: native .safetensors, SGLang .json/.pt, TensorRT-LLM
folders — truncated, bytes flipped, fields of the wrong type or shape, NaN/inf/negative, enormous sizes.

The library answers each with a valid object or a ValueError (never another exception, never a
multi-gigabyte allocation). `.pt` files are never unpickled beyond weights_only=True. The valid files
mutated here: tests/support/fuzz_bases.py; placement JSON and the CLI: test_fuzz_placements.py.
Hypothesis is derandomized: the same inputs every run.
"""

from __future__ import annotations

import json
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

# base and report are the module's fixtures: pytest finds them by their names here.
from fuzz_bases import (  # noqa: F401
    COUNTS_WLE, E, LAYERS, TOP_K, base, native_tensors, native_trace, placement_dict, report, sglang_per_token,
    trtllm_folder,
)
from fuzzing import (
    DEEP, FUZZ, TEXT, cli, json_value, library, mutated_bytes, mutated_json, safetensors_bytes, write,
)
from moeplace.placement import load_placement
from moeplace.readers import load_trace
from moeplace.trace import trace_to_bytes


# -- native trace files ------------------------------------------------------------------------

def tensor_junk() -> st.SearchStrategy:
    """Arrays a trace tensor must not be: wrong dtype, wrong rank or shape, NaN, inf, negative, empty."""
    dtypes = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_])
    shapes = st.lists(st.integers(0, 9), max_size=4).map(tuple)
    fill = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1.0, 7.0, 1e30])
    return st.builds(_filled, dtypes, shapes, fill)


def _filled(dtype, shape: tuple, value: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN, inf, 1e30 cast to integers on purpose
        return np.full(shape, value).astype(dtype, casting="unsafe")


@FUZZ
@given(data=st.data())
def test_native_trace_fuzzed(data):
    tensors, meta = native_tensors()
    op = data.draw(st.sampled_from(["bytes", "tensor", "metadata"]))
    if op == "bytes":
        raw = trace_to_bytes(native_trace())
        blob = data.draw(mutated_bytes(raw, hot=8 + int.from_bytes(raw[:8], "little")))
    elif op == "tensor":
        name = data.draw(st.sampled_from(sorted(tensors) + ["extra"]))
        if data.draw(st.booleans()) and name in tensors:
            del tensors[name]
        else:
            tensors[name] = data.draw(tensor_junk())
        blob = st_save(tensors, metadata=meta)
    else:
        name = data.draw(st.sampled_from(sorted(meta) + ["num_model_layers"]))
        junk = st.sampled_from(["", "0", "-1", "2.5", "1e9", "999999999999", "10000", "nan", "{}", "[1]", '{"a": 1}'])
        meta[name] = data.draw(junk | TEXT | st.just(DEEP))
        blob = st_save(tensors, metadata=meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "t.safetensors", blob)
        library("native trace", lambda: load_trace(path))


@pytest.mark.parametrize("header, problem", [
    # 10^9 x 10^9 x 10^9 float64 backed by 8 bytes: refused from the header, nothing allocated
    ({"counts_WLE": {"dtype": "F64", "shape": [10**9] * 3, "data_offsets": [0, 8]}}, "not a readable safetensors"),
    ({"counts_WLE": {"dtype": "F64", "shape": [2**62, 2], "data_offsets": [0, 8]}}, "not a readable safetensors"),
    ({"__metadata__": [1, 2]}, "'__metadata__' must map names to strings"),
    ({"__metadata__": {"format": 1}}, "'__metadata__' must map names to strings"),
])
def test_native_trace_header_claims(tmp_path, header, problem):
    header.setdefault("__metadata__", {"format": "moeplace.trace", "format_version": "1", "top_k": "2"})
    path = write(tmp_path, "t.safetensors", safetensors_bytes(header, b"\0" * 8))
    with pytest.raises(ValueError, match=problem):
        load_trace(path)


def test_layer_count_claims_are_bounded(tmp_path):
    tensors, meta = native_tensors()
    meta["num_model_layers"] = str(10**9)  # export writes a row per model layer: refused on reading
    path = write(tmp_path, "t.safetensors", st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="'num_model_layers' is 1000000000, more than the 10000"):
        load_trace(path)
    doc = placement_dict()
    doc["layers"], doc["num_model_layers"] = [1, 2, 10**9], 10**9 + 1
    with pytest.raises(ValueError, match="more than the 10000 layers"):
        load_placement(write(tmp_path, "p.json", json.dumps(doc)))


# -- SGLang dumps ------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_sglang_json_fuzzed(data):
    base = {"logical_count": COUNTS_WLE.astype(int).tolist()}
    text = data.draw(mutated_json(base) | mutated_bytes(json.dumps(base).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "dump.json", text)
        library("sglang json", lambda: load_trace(path, top_k=TOP_K))


def torch_junk() -> st.SearchStrategy:
    """What a pickled dump field must not be: odd dtypes and layouts, NaN/inf/negative, wrong shapes,
    views that claim far more values than stored, non-tensors."""
    dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int32, torch.int64,
                              torch.uint8, torch.bool, torch.complex64])
    shapes = st.lists(st.integers(0, 10), max_size=4)
    fill = st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 3.0, 99.0])
    dense = st.builds(lambda d, s, v: torch.full(s, v).to(d), dtypes, shapes, fill)
    odd = st.sampled_from([
        lambda: torch.ones(4, 8).to_sparse(),
        lambda: torch.quantize_per_tensor(torch.ones(4, 8), 0.1, 0, torch.qint8),
        lambda: torch.ones(1, dtype=torch.int32).expand(30_000, 61, 256),  # 1.3 KB file, 470 M values
        lambda: torch.arange(200_000).as_strided((10**5, 10**4), (1, 1)),  # overlapping rows: 10^9 values
        lambda: torch.Size([4, 8]),
        lambda: torch.float32,
    ]).map(lambda make: make())
    return st.one_of(dense, odd, json_value().filter(lambda v: "@DEEP@" not in json.dumps(v)))


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning", "ignore:TypedStorage is deprecated:UserWarning")
@FUZZ
@given(data=st.data())
def test_sglang_pt_fuzzed(data):
    dump = sglang_per_token()
    field = data.draw(st.sampled_from(["logical_count", "last_physical_to_logical_map", "records",
                                       "global_physical_count", "topk_ids_of_layer", "forward_pass_id"]))
    if field in ("logical_count", "last_physical_to_logical_map", "records"):
        dump[field] = data.draw(torch_junk())
    else:
        dump["records"][data.draw(st.integers(0, 1))][field] = data.draw(torch_junk())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dump.pt"
        torch.save(dump, path)
        if data.draw(st.booleans()):
            path.write_bytes(data.draw(mutated_bytes(path.read_bytes())))
        library("sglang pt", lambda: load_trace(path, top_k=TOP_K if "logical_count" in dump else None))


def test_pt_view_claiming_far_more_values_than_stored_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save({"logical_count": torch.ones(1, dtype=torch.int32).expand(100_000, 61, 256)}, path)
    assert path.stat().st_size < 2000
    start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"shape \[100000, 61, 256\] \(1561600000 values\) but the file stores only 1"):
        load_trace(path)
    assert time.perf_counter() - start < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KB: nothing was expanded


class _Payload:
    """Unpickling calls open(marker, 'w'): the marker file appears only if the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["torch zip", "raw pickle"])
def test_malicious_pickle_is_refused_not_run(base, tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch zip":
        torch.save({"logical_count": _Payload(marker)}, path)
    else:  # torch.load also reads a bare (legacy, non-zip) pickle stream
        path.write_bytes(pickle.dumps({"logical_count": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match="evil.pt"):
        load_trace(path)
    assert not marker.exists()
    assert cli("evaluate cli", ["evaluate", base["placement"], path], tmp_path) == 1
    assert not marker.exists()


# -- TensorRT-LLM statistic folders ------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_trtllm_folder_fuzzed(data):
    meta, rank_bytes = None, None
    op = data.draw(st.sampled_from(["meta", "rank bytes", "rank tensors"]))
    if op == "meta":
        meta = data.draw(mutated_json({"num_experts": E, "num_experts_per_token": TOP_K}))
    elif op == "rank bytes":
        good = st_save({f"0_{layer}": COUNTS_WLE[0, row].astype(np.int64) for row, layer in enumerate(LAYERS)})
        rank_bytes = data.draw(mutated_bytes(good, hot=8 + int.from_bytes(good[:8], "little")))
    else:
        names = st.sampled_from(["0_1", "1_2", "0_10000", "0_1000000000", "1_x", "a\nb", "99_3"])
        rank_bytes = st_save(data.draw(st.dictionaries(names, tensor_junk(), min_size=1, max_size=3)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = trtllm_folder(Path(tmp) / "stat", meta, rank_bytes)
        library("trtllm folder", lambda: load_trace(folder))


