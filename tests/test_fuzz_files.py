"""Every file moeplace reads, fuzzed: traces (native .safetensors, SGLang .json/.pt, TensorRT-LLM
folders), placement JSON, a checkpoint's config.json, index and tensors — truncated, bytes flipped,
fields of the wrong type or shape, NaN/inf/negative, enormous sizes, another model's.

The library answers each with a valid object or a ValueError (never another exception, never a
multi-gigabyte allocation); the CLI (`evaluate`, `solve`, `export`) exits 0, or 1 with one line on
stderr, no traceback and no output file. `.pt` files are never unpickled beyond weights_only=True.
Hypothesis is derandomized: the same inputs every run.
"""

from __future__ import annotations

import copy
import json
import pickle
import resource
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save
from typer.testing import CliRunner

from moeplace.cli import app
from moeplace.placement import load_placement, placement_to_json, trivial_placement
from moeplace.readers import load_trace
from moeplace.runtime.checkpoint import Checkpoint, expert_tensor, scale_name
from moeplace.runtime.config import ModelConfig
from moeplace.runtime.fp8 import quantize_blockwise
from moeplace.runtime.model import EPModel
from moeplace.runtime.tiny import tiny_config
from moeplace.topology import Topology
from moeplace.trace import Trace, trace_to_bytes

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLI_FUZZ = settings(FUZZ, max_examples=40)
runner = CliRunner(env={"COLUMNS": "200"})
TRIED: Counter = Counter()  # inputs tried per reader / command, printed at the end (README figures)
SECONDS_PER_INPUT = 2.0  # a bad file fails fast: no reader may take longer on these small inputs

# The data every valid file below describes: 8 experts on MoE layers 1..3 of a 4-layer model, top-2,
# placed on 2 GPUs x 5 slots. A trace of another model (other experts or layers) fails `evaluate`.
E, LAYERS, TOP_K, NUM_MODEL_LAYERS = 8, [1, 2, 3], 2, 4
RNG = np.random.default_rng(3)
COUNTS_WLE = RNG.integers(1, 50, size=(2, 3, E)).astype(np.float64)
# Text in fuzzed names and values: newlines and NULs (one-line messages), no '[' (see
# test_rich_markup_in_a_message_is_printed_as_text: a known CLI bug, reported).
TEXT = st.text(alphabet="ab_01.-/ \n\x00é", max_size=6)
HUGE_INTS = [10**9, 2**31, 2**63 - 1, 2**63, 10**30, -(2**63) - 1]
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's json nests


@pytest.fixture(scope="module", autouse=True)
def report():
    """Fail if the module's fuzzing grew the process by more than 1 GB (a reader that allocates from a
    claimed size instead of checking it); print the inputs tried."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"\nfuzz_files: {sum(TRIED.values())} inputs tried {dict(TRIED)}; max RSS grew {grown_mb:.0f} MB")
    assert grown_mb < 1024


# -- helpers -----------------------------------------------------------------------------------

def library(kind: str, load) -> object | None:
    """`load()`'s result, or None when it raised ValueError; any other exception fails the test."""
    TRIED[kind] += 1
    start = time.perf_counter()
    try:
        return load()
    except ValueError as exc:
        assert str(exc), "a ValueError without a message"
        return None
    finally:
        assert time.perf_counter() - start < SECONDS_PER_INPUT


def cli(kind: str, args: list, folder: Path, outputs: tuple[Path, ...] = ()) -> int:
    """Run the CLI; exit 0, or exit 1 with one 'error:' line, no traceback, no output or temporary file."""
    TRIED[kind] += 1
    before = set(folder.iterdir())
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        assert all(out.exists() for out in outputs)
        return 0
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert set(folder.iterdir()) == before - set(outputs), "a failed command left a file behind"
    return 1


def json_value() -> st.SearchStrategy:
    """Junk for any JSON field: wrong types, NaN/inf, negative and enormous numbers, nested junk."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.sampled_from(HUGE_INTS),
                     st.floats(allow_nan=True, allow_infinity=True), TEXT, st.just("@DEEP@"))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=10)


@st.composite
def mutated_json(draw, base: object) -> str:
    """`base` with one node replaced by junk, deleted, wrapped in a list or duplicated; as JSON text."""
    doc = copy.deepcopy(base)
    parent, key, node = None, None, doc
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):  # descend at random
        key = draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
        parent, node = node, node[key]
    op = draw(st.sampled_from(["replace", "delete", "wrap", "duplicate"]))
    if parent is None:
        doc = draw(json_value()) if op in ("replace", "delete") else [doc] if op == "wrap" else [doc, doc]
    elif op == "replace":
        parent[key] = draw(json_value())
    elif op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [node]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    else:
        parent[key] = [node, node]
    return json.dumps(doc).replace('"@DEEP@"', DEEP)


@st.composite
def mutated_bytes(draw, data: bytes, hot: int = 0) -> bytes:
    """Truncated, bytes flipped (half of them within the first `hot` bytes: a header), or junk inserted."""
    op = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if op == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    where = st.integers(0, len(data) - 1)
    if hot:
        where = st.one_of(st.integers(0, min(hot, len(data)) - 1), where)
    out = bytearray(data)
    if op == "flip":
        for i in draw(st.lists(where, min_size=1, max_size=6)):
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    i = draw(where)
    return bytes(out[:i]) + draw(st.binary(min_size=1, max_size=12)) + bytes(out[i:])


def write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header: for claims the writer would refuse to make."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


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


# -- checkpoint: config.json, index, tensors ---------------------------------------------------

def mini_checkpoint_tensors() -> dict[str, torch.Tensor]:
    """The tensors of the tiny model that Checkpoint checks and `read_expert(1, 0)` reads (not the
    whole model: ~0.3 MB to write per example)."""
    c, gen = tiny_config(), torch.Generator().manual_seed(0)
    D, H, F = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    attn = f"model.layers.{c.num_hidden_layers - 1}.self_attn"
    fp8 = {
        f"{attn}.o_proj.weight": (D, H * c.v_head_dim),
        f"{attn}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, D),
        f"{attn}.kv_b_proj.weight": (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        f"{attn}.q_b_proj.weight": (H * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank),
        "model.layers.0.mlp.down_proj.weight": (D, c.intermediate_size),
        "model.layers.1.mlp.shared_experts.down_proj.weight": (D, F),
        expert_tensor(1, c.n_routed_experts - 1, "down_proj"): (D, F),
        **{expert_tensor(1, 0, proj): (F, D) if proj != "down_proj" else (D, F)
           for proj in ("gate_proj", "up_proj", "down_proj")},
    }
    out = {"model.embed_tokens.weight": torch.randn(c.vocab_size, D, generator=gen).bfloat16(),
           "model.layers.1.mlp.gate.weight": torch.randn(c.n_routed_experts, D, generator=gen).bfloat16()}
    for name, shape in fp8.items():
        out[name], out[scale_name(name)] = quantize_blockwise(torch.randn(*shape, generator=gen), c.weight_block_size)
    return out


@pytest.fixture(scope="module")
def checkpoint_parts() -> dict:
    from safetensors.torch import save

    tensors = mini_checkpoint_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    return {"config": tiny_config().to_dict(), "tensors": tensors,
            "shards": {f: save({n: tensors[n] for n in part}) for f, part in shards.items()},
            "index": {"weight_map": {n: f for f, part in shards.items() for n in part}}}


def read_checkpoint(folder: Path) -> None:
    with Checkpoint(folder) as ckpt:
        ckpt.read_expert(1, 0)
        ckpt.read_weight("model.embed_tokens.weight", (259, 256))


def test_mini_checkpoint_is_valid(checkpoint_parts, tmp_path):
    write_checkpoint(tmp_path, checkpoint_parts)
    read_checkpoint(tmp_path)


def write_checkpoint(folder: Path, parts: dict, config: str | None = None, index: str | None = None,
                     shard: bytes | None = None) -> Path:
    write(folder, "config.json", config if config is not None else json.dumps(parts["config"]))
    write(folder, "model.safetensors.index.json", index if index is not None else json.dumps(parts["index"]))
    for i, (name, data) in enumerate(parts["shards"].items()):
        write(folder, name, shard if shard is not None and i == 1 else data)
    return folder


@FUZZ
@given(data=st.data())
def test_model_config_fuzzed(checkpoint_parts, data):
    """config.json: ValueError, or a config that transformers accepts too."""
    text = data.draw(mutated_json(checkpoint_parts["config"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "config.json", text)
        config = library("model config.json", lambda: ModelConfig.load(path.parent))
        if config is not None:
            library("model config.json", config.to_hf)


@FUZZ
@given(data=st.data())
def test_checkpoint_fuzzed(checkpoint_parts, data):
    """Index and tensors (names, dtypes, shapes, bytes) of a sharded checkpoint, and its config's sizes."""
    config, index, shard = None, None, None
    op = data.draw(st.sampled_from(["index", "shard bytes", "tensor", "config size"]))
    if op == "index":
        index = data.draw(mutated_json(checkpoint_parts["index"]) | st.just(json.dumps({"weight_map": {"x": "../x"}})))
    elif op == "shard bytes":
        good = next(iter(reversed(checkpoint_parts["shards"].values())))
        shard = data.draw(mutated_bytes(good, hot=8 + int.from_bytes(good[:8], "little")))
    elif op == "tensor":
        from safetensors.torch import save

        tensors = dict(checkpoint_parts["tensors"])
        name = data.draw(st.sampled_from(sorted(tensors)))
        change = data.draw(st.sampled_from(["drop", "bf16", "f32", "short", "transpose", "scalar"]))
        t = tensors.pop(name)
        if change != "drop":
            tensors[name] = {"bf16": lambda: t.float().bfloat16(), "f32": lambda: t.float(), "short": lambda: t[:1],
                             "transpose": lambda: t.T.contiguous(), "scalar": lambda: t.flatten()[:1].reshape(())}[change]()
        names = checkpoint_parts["index"]["weight_map"]
        shards = {f: save({n: tensors[n] for n in tensors if names[n] == f}) for f in checkpoint_parts["shards"]}
        parts = dict(checkpoint_parts, shards=shards)
    else:  # the config claims sizes the tensors do not have: a config of another model, or absurd ones
        field = data.draw(st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                           "num_hidden_layers", "n_routed_experts", "n_shared_experts",
                                           "num_attention_heads", "kv_lora_rank", "q_lora_rank", "v_head_dim",
                                           "qk_rope_head_dim", "qk_nope_head_dim"]))
        value = data.draw(st.sampled_from([2, 3, 16, 1024, 10**5, 10**9, 2**40]))
        config = json.dumps({**checkpoint_parts["config"], field: value})
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp), parts if op == "tensor" else checkpoint_parts, config, index, shard)
        library("checkpoint", lambda: read_checkpoint(folder))


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 10**9), ("vocab_size", 10**9), ("intermediate_size", 10**9),
    ("moe_intermediate_size", 10**8), ("n_routed_experts", 2**20), ("num_attention_heads", 10**6),
])
def test_model_refuses_a_config_claiming_sizes_its_weights_lack(checkpoint_parts, tmp_path, field, value):
    """Before the fix a config.json of 10^9 layers or a 10^9 vocabulary allocated (or tried to) for
    minutes; now the model refuses it from the config and tensor headers alone."""
    config = {**checkpoint_parts["config"], field: value}
    if field == "n_routed_experts":
        config["n_group"] = config["topk_group"] = 1
    folder = write_checkpoint(tmp_path, checkpoint_parts, json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{field}"):
        EPModel.load(folder, None, group=None, device=torch.device("cpu"))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("config_text, problem", [
    (json.dumps({**tiny_config().to_dict(), "num_hidden_layers": 10**9}), "more than the 10000 layers"),
    (json.dumps({**tiny_config().to_dict(), "quantization_config": "fp8"}), "weight_block_size"),
    (DEEP, "cannot read"),
    ('{"model_type": "deepseek_v3", ', "cannot read"),
])
def test_serve_refuses_a_bad_config_in_one_line(tmp_path, monkeypatch, config_text, problem):
    import subprocess

    def no_ranks(*_, **__):  # a config that passed the preflight would start a real server here
        raise AssertionError(f"moeplace serve accepted {tmp_path / 'config.json'}")

    monkeypatch.setattr(subprocess, "call", no_ranks)
    write(tmp_path, "config.json", config_text)
    result = runner.invoke(app, ["serve", "--model", str(tmp_path), "--nproc", "2"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr
