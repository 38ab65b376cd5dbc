"""Every file moeplace reads, fuzzed: traces (native .safetensors, SGLang .json/.pt, TensorRT-LLM
folders), placement JSON, a checkpoint's config.json, index and tensors — truncated, bytes flipped,
fields of the wrong type or shape, NaN/inf/negative, enormous sizes, another model's.

The library answers each with a valid object or a ValueError (never another exception, never a
multi-gigabyte allocation); the CLI (`evaluate`, `solve`, `export`) exits 0, or 1 with one line on
stderr, no traceback and no output file. `.pt` files are never unpickled beyond weights_only=True.
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

from fuzzing import CLI_FUZZ, DEEP, FUZZ, TEXT, TRIED, cli, json_value, library, mutated_bytes, mutated_json, safetensors_bytes, write
from moeplace.placement import load_placement, placement_to_json, trivial_placement
from moeplace.readers import load_trace
from moeplace.topology import Topology
from moeplace.trace import Trace, trace_to_bytes


# The data every valid file below describes: 8 experts on MoE layers 1..3 of a 4-layer model, top-2,
# placed on 2 GPUs x 5 slots. A trace of another model (other experts or layers) fails `evaluate`.
E, LAYERS, TOP_K, NUM_MODEL_LAYERS = 8, [1, 2, 3], 2, 4
RNG = np.random.default_rng(3)
COUNTS_WLE = RNG.integers(1, 50, size=(2, 3, E)).astype(np.float64)


@pytest.fixture(scope="module", autouse=True)
def report():
    """Fail if the module's fuzzing grew the process by more than 1 GB (a reader that allocates from a
    claimed size instead of checking it); print the inputs tried."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"\nfuzz_files: {sum(TRIED.values())} inputs tried {dict(TRIED)}; max RSS grew {grown_mb:.0f} MB")
    assert grown_mb < 1024


# -- valid base files --------------------------------------------------------------------------

def native_trace() -> Trace:
    topk = RNG.integers(0, E, size=(5, 3, TOP_K))
    return Trace(COUNTS_WLE, np.array(LAYERS), TOP_K, topk_ids_TLK=topk, tokens_W=np.array([10.0, 12.0]),
                 time_W=np.array([1.7e9, 1.7e9 + 1]), num_model_layers=NUM_MODEL_LAYERS, metadata={"model": "m"})


def native_tensors() -> tuple[dict, dict]:
    data = trace_to_bytes(native_trace())
    from safetensors.numpy import load

    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8 : 8 + n])["__metadata__"]


def placement_dict() -> dict:
    placement = trivial_placement(E, Topology(2, 1, 5), np.array(LAYERS), NUM_MODEL_LAYERS)
    return json.loads(placement_to_json(placement))


def sglang_per_token() -> dict:
    """An SGLang per_token dump: 4 dumped rows (row 0 dense), 10 physical slots, 8 top-k slots (top-2 used)."""
    p2l = torch.tensor([list(range(8)) + [0, 1]] * 4)
    ids = torch.full((4, 6, 8), -1, dtype=torch.int32)
    ids[1:, :, :2] = torch.randint(0, 10, (3, 6, 2), dtype=torch.int32)
    counts = torch.zeros(4, 10)
    counts[1:] = torch.rand(3, 10) * 10
    record = {"forward_pass_id": 0, "rank": 0, "global_physical_count": counts, "topk_ids_of_layer": ids}
    return {"records": [record, dict(record, forward_pass_id=1)], "last_physical_to_logical_map": p2l}


def trtllm_folder(folder: Path, meta: str | None = None, rank_bytes: bytes | None = None) -> Path:
    folder.mkdir()
    (folder / "meta_info.json").write_text(meta or json.dumps({"num_experts": E, "num_experts_per_token": TOP_K}))
    for rank in (0, 1):
        tensors = {f"{it}_{layer}": COUNTS_WLE[it, row].astype(np.int64) for it in (0, 1) for row, layer in enumerate(LAYERS)}
        data = st_save(tensors)
        (folder / f"rank{rank}.safetensors").write_bytes(rank_bytes if rank_bytes is not None and rank == 1 else data)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """Valid files of each kind, plus a placement and trace that evaluate together."""
    root = tmp_path_factory.mktemp("base")
    out = {"root": root, "placement": write(root, "placement.json", json.dumps(placement_dict())),
           "trace": write(root, "trace.safetensors", trace_to_bytes(native_trace())),
           "trtllm": trtllm_folder(root / "trtllm")}
    torch.save(sglang_per_token(), root / "per_token.pt")
    out["per_token"] = root / "per_token.pt"
    for path in (out["trace"], out["trtllm"], out["per_token"]):
        assert load_trace(path).num_experts == E  # the bases are valid
    assert load_placement(out["placement"]).num_experts == E
    return out


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


# -- placement JSON ----------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_placement_json_fuzzed(data):
    doc = placement_dict()
    text = data.draw(mutated_json(doc) | mutated_bytes(json.dumps(doc).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "p.json", text)
        library("placement json", lambda: load_placement(path))


@pytest.mark.parametrize("change, problem", [
    # Before the fix 10^9 experts allocated 30 GB (replica counts [L, E]) and 10^30 overflowed.
    ({"num_experts": 10**9}, "1000000000 experts do not fit in 10 slots"),
    ({"num_experts": 10**30}, "experts do not fit in 10 slots"),
    ({"topology": {"num_gpus": 2, "gpus_per_node": 1, "slots_per_gpu": 10**9}}, "expected 2000000000 along axis 1"),
    ({"num_model_layers": 10**9}, "more than the 10000 layers"),
])
def test_placement_enormous_claims_fail_fast(tmp_path, change, problem):
    path = write(tmp_path, "p.json", json.dumps({**placement_dict(), **change}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=problem):
        load_placement(path)
    assert time.perf_counter() - start < 1
    with pytest.raises(ValueError, match="not valid JSON"):
        load_placement(write(tmp_path, "deep.json", DEEP))


def amplifying_placement(slots: int, experts: int) -> dict:
    """One GPU whose slots hold every expert once and expert 0 in all the others: a small file whose
    replica table (layers x experts x most replicas) would be huge."""
    row = list(range(experts)) + [0] * (slots - experts)
    return {**placement_dict(), "num_experts": experts, "phy2log": [row] * len(LAYERS),
            "topology": {"num_gpus": 1, "gpus_per_node": 1, "slots_per_gpu": slots}}


@pytest.mark.parametrize("change, problem", [
    ({"provenance": {"budget": float("nan")}}, "NaN is not a JSON number"),
    ({"topology": {"num_gpus": 2, "gpus_per_node": 1, "slots_per_gpu": 5, "nvlink_gbps": float("inf")}},
     "Infinity is not a JSON number"),
    ({"topology": {"num_gpus": 2, "gpus_per_node": 1, "slots_per_gpu": 5, "gpu_memory_budget": float("-inf")}},
     "-Infinity is not a JSON number"),
])
def test_placement_non_finite_numbers_are_refused(tmp_path, change, problem):
    """Before the fix they were accepted, and a server then served JSON that strict parsers reject."""
    with pytest.raises(ValueError, match=problem):
        load_placement(write(tmp_path, "p.json", json.dumps({**placement_dict(), **change})))


def test_size_amplifying_placement_fails_fast_in_evaluate(tmp_path, base):
    """Before the fix 124 KB asked for 2.4 GB and about 1 MB for 170 GiB, with a traceback."""
    path = write(tmp_path, "amplify.json", json.dumps(amplifying_placement(60_000, 30_000)))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="replicas of the most copied expert"):
        load_placement(path)
    assert time.perf_counter() - start < 2
    assert cli("evaluate cli", ["evaluate", path, base["trace"]], tmp_path) == 1


# -- the CLI on fuzzed files -------------------------------------------------------------------

@CLI_FUZZ
@given(data=st.data())
def test_cli_evaluate_and_solve_on_fuzzed_traces(base, data):
    kind = data.draw(st.sampled_from(["native", "per_token", "trtllm"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if kind == "native":
            raw = base["trace"].read_bytes()
            trace = write(folder, "t.safetensors", data.draw(mutated_bytes(raw, hot=8 + int.from_bytes(raw[:8], "little"))))
        elif kind == "per_token":
            trace = write(folder, "t.pt", data.draw(mutated_bytes(base["per_token"].read_bytes())))
        else:
            trace = trtllm_folder(folder / "stat", data.draw(mutated_json({"num_experts": E, "num_experts_per_token": TOP_K})))
        cli("evaluate cli", ["evaluate", base["placement"], trace], folder)
        out = folder / "solved.json"
        cli("solve cli", ["solve", trace, "-o", out, "--gpus", "2", "--gpus-per-node", "1", "--slots-per-gpu", "5",
                          "--method", "greedy", "--workers", "1", "--time-limit", "1"], folder, (out,))


@CLI_FUZZ
@given(data=st.data())
def test_cli_evaluate_export_solve_on_fuzzed_placements(base, data):
    doc = placement_dict()
    text = data.draw(mutated_json(doc) | mutated_bytes(json.dumps(doc).encode()))
    fmt = data.draw(st.sampled_from(["sglang", "trtllm", "vllm", "eplb"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        placement = write(folder, "p.json", text)
        cli("evaluate cli", ["evaluate", placement, base["trace"]], folder)
        out = folder / f"exported.{fmt}"
        cli("export cli", ["export", placement, "--format", fmt, "-o", out], folder, (out,))
        out = folder / "solved.json"
        cli("solve cli", ["solve", base["trace"], "--from", placement, "-o", out, "--gpus", "2", "--gpus-per-node", "1",
                          "--slots-per-gpu", "5", "--method", "greedy", "--workers", "1"], folder, (out,))


def test_cli_refuses_another_models_trace_and_placement(base, tmp_path):
    """Wrong model: a trace of 16 experts for an 8-expert placement, and a placement of other layers."""
    other = Trace(RNG.integers(1, 9, size=(1, 3, 16)).astype(float), np.array(LAYERS), TOP_K, source="other")
    trace = write(tmp_path, "other.safetensors", trace_to_bytes(other))
    assert cli("evaluate cli", ["evaluate", base["placement"], trace], tmp_path) == 1
    doc = placement_dict()
    doc["layers"] = [0, 1, 2]
    placement = write(tmp_path, "other.json", json.dumps(doc))
    assert cli("evaluate cli", ["evaluate", placement, base["trace"]], tmp_path) == 1
    out = tmp_path / "s.json"
    assert cli("solve cli", ["solve", base["trace"], "--from", placement, "-o", out, "--gpus", "2", "--gpus-per-node",
                             "1", "--slots-per-gpu", "5", "--method", "greedy"], tmp_path, (out,)) == 1


def test_rich_markup_in_a_message_is_printed_as_text(tmp_path):
    doc = placement_dict()
    doc["topology"]["[/]"] = 1  # the message names the unknown field
    placement = write(tmp_path, "p.json", json.dumps(doc))
    assert cli("export cli", ["export", placement, "--format", "sglang", "-o", tmp_path / "o.json"], tmp_path) == 1
