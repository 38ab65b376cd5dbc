"""Trace readers: real SGLang dumps from ../shared and engine formats written here (bad input:
test_reader_errors.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from moeplace.resources import EXAMPLE_TRACE
from moeplace.readers import DEEPSEEK_V3_GUESS, load_trace, normalize_layers
from moeplace.trace import Trace, save_trace
from trace_files import per_token_dump, write_trtllm

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO.parent / "shared" / "traces"
RNG = np.random.default_rng(7)


@pytest.fixture
def shared_traces() -> Path:
    if not TRACES.is_dir():
        pytest.skip(f"real traces not found at {TRACES} (the shared folder beside the repository)")
    return TRACES


def deepseek_counts(windows: int) -> np.ndarray:
    """[windows, 61, 256] random counts with the 3 dense layers zero, like SGLang's dumps."""
    counts = RNG.integers(1, 1000, size=(windows, 61, 256)).astype(np.int32)
    counts[:, :3] = 0
    return counts


# ---------------------------------------------------------------- SGLang stat dumps


def test_all_sglang_json_files_read_as_58_moe_layers(shared_traces):
    files = sorted((shared_traces / "sglang-dsv3-ep-statistics").glob("*.json"))
    assert len(files) == 8
    for file in files:
        trace = load_trace(file)
        raw = np.array(json.loads(file.read_text())["logical_count"])
        assert trace.counts_WLE.shape == (1, 58, 256)
        assert trace.layers.tolist() == list(range(3, 61))
        np.testing.assert_array_equal(trace.counts_WLE[0], raw[3:])
        assert (trace.n_group, trace.topk_group, trace.top_k, trace.num_model_layers) == (8, 4, 8, 61)
        assert trace.metadata["engine"] == "sglang"
        assert trace.metadata["model"] == DEEPSEEK_V3_GUESS
        assert trace.metadata["source"] == file.name


def test_sglang_stat_pt_reads_one_window_per_step(tmp_path):
    torch = pytest.importorskip("torch")
    counts = deepseek_counts(4)
    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts), "average_utilization_rate_over_window": None}, path)
    trace = load_trace(path)
    assert trace.counts_WLE.shape == (4, 58, 256)
    np.testing.assert_array_equal(trace.counts_WLE, counts[:, 3:])
    assert trace.layers.tolist() == list(range(3, 61)) and trace.n_group == 8


def test_sglang_pt_nested_list_and_unfilled_ring_steps(tmp_path):
    torch = pytest.importorskip("torch")
    counts = deepseek_counts(3)
    counts[1] = 0  # a ring-buffer step never written
    path = tmp_path / "ring.pt"
    torch.save({"logical_count": counts.tolist()}, path)
    trace = load_trace(path)
    assert trace.num_windows == 2
    np.testing.assert_array_equal(trace.counts_WLE, counts[[0, 2], 3:])
    assert "1 all-zero windows dropped" in trace.metadata["notes"]


def test_vllm_style_moe_rows_are_the_last_layers(tmp_path):
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps({"logical_count": RNG.integers(1, 9, size=(58, 16)).tolist()}))
    trace = load_trace(path, num_model_layers=61, top_k=4)
    assert trace.layers.tolist() == list(range(3, 61))
    assert (trace.n_group, trace.num_model_layers) == (1, 61)


def test_normalize_layers_conventions():
    sglang = RNG.random((2, 61, 256))
    sglang[:, :3] = 0
    assert normalize_layers(sglang).layers.tolist() == list(range(3, 61))
    vllm = normalize_layers(RNG.random((1, 58, 8)), num_model_layers=61)
    assert vllm.layers.tolist() == list(range(3, 61)) and vllm.rows.tolist() == list(range(58))
    trt = normalize_layers(RNG.random((1, 3, 8)), layer_ids=[60, 3, 4])
    assert trt.layers.tolist() == [3, 4, 60] and trt.rows.tolist() == [1, 2, 0] and trt.num_model_layers == 61
    with pytest.raises(ValueError, match="5 layer rows, more than num_model_layers 4"):
        normalize_layers(RNG.random((1, 5, 8)), num_model_layers=4)


def test_deepseek_moe_rows_without_layer_count_are_inferred(tmp_path):
    path = tmp_path / "eplb.json"
    path.write_text(json.dumps({"logical_count": RNG.integers(1, 9, size=(58, 256)).tolist()}))
    trace = load_trace(path)
    assert trace.layers.tolist() == list(range(3, 61)) and trace.n_group == 8
    assert "inferred from shape" in trace.metadata["notes"]


# ---------------------------------------------------------------- SGLang per-pass / per-token dumps


def test_sglang_per_token_dump_folds_slots_to_experts(tmp_path):
    torch = pytest.importorskip("torch")
    dump, logical = per_token_dump([5, 3])
    path = tmp_path / "expert_distribution_recorder_1_0.pt"
    torch.save(dump, path)
    trace = load_trace(path)
    assert trace.layers.tolist() == [1, 2, 3] and trace.top_k == 8
    np.testing.assert_array_equal(trace.topk_ids_TLK, np.concatenate(logical)[:, 1:])
    for w, log_TRK in enumerate(logical):
        expected = [np.bincount(log_TRK[:, r].ravel(), minlength=16) for r in range(1, 4)]
        np.testing.assert_array_equal(trace.counts_WLE[w], expected)
    assert trace.tokens_W.tolist() == [5, 3]
    assert json.loads(trace.metadata["window_names"]) == ["0", "1"]


def test_sglang_per_pass_dump_has_counts_only(tmp_path):
    torch = pytest.importorskip("torch")
    dump, logical = per_token_dump([4, 6], with_ids=False)
    path = tmp_path / "per_pass.pt"
    torch.save(dump, path)
    trace = load_trace(path, top_k=8)
    assert trace.topk_ids_TLK is None and trace.counts_WLE.shape == (2, 3, 16)
    assert trace.counts_WLE.sum() == (4 + 6) * 3 * 8


# ---------------------------------------------------------------- TensorRT-LLM statistic folders


def test_trtllm_statistic_sums_ranks_and_maps_layer_ids(tmp_path):
    counts = RNG.integers(0, 50, size=(2, 3, 4, 16)).astype(np.int64)  # ranks, iterations, layers, experts
    folder = tmp_path / "expert_statistic"
    write_trtllm(folder, counts, iters=[100, 101, 102], layers=[3, 4, 5, 60], top_k=4)
    save_file({"100_3": np.zeros((7, 4), dtype=np.int64)}, str(folder / "rank0_raw.safetensors"))  # not counts
    trace = load_trace(folder)
    np.testing.assert_array_equal(trace.counts_WLE, counts.sum(axis=0))
    assert trace.layers.tolist() == [3, 4, 5, 60] and trace.num_model_layers == 61 and trace.top_k == 4
    assert trace.metadata["engine"] == "tensorrt-llm" and trace.metadata["ranks"] == "2"
    assert load_trace(folder / "meta_info.json").counts_WLE.shape == (3, 4, 16)


# ---------------------------------------------------------------- moeplace files and the example


def test_native_round_trip_with_topk_tokens_and_time(tmp_path):
    trace = Trace(
        counts_WLE=RNG.random((3, 2, 8)) * 100, layers=np.array([1, 5]), top_k=2,
        topk_ids_TLK=RNG.integers(-1, 8, size=(10, 2, 2)), tokens_W=np.array([4.0, 5.0, 1.0]),
        time_W=np.array([1.7e9, 1.7e9 + 60, 1.7e9 + 120]), num_model_layers=6, metadata={"model": "tiny"},
    )
    path = tmp_path / "trace.safetensors"
    save_trace(trace, path)
    back = load_trace(path)
    for name in ("counts_WLE", "layers", "topk_ids_TLK", "tokens_W", "time_W"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert (back.top_k, back.num_model_layers, back.metadata) == (2, 6, {"model": "tiny"})


def test_example_trace_loads_with_shapes_and_attribution():
    trace = load_trace(EXAMPLE_TRACE)
    assert trace.counts_WLE.shape == (6, 3, 64)
    assert trace.layers.tolist() == [0, 7, 15] and trace.num_model_layers == 16 and trace.top_k == 8
    assert json.loads(trace.metadata["window_names"]) == ["arxiv", "book", "c4", "github", "wikipedia", "tulu"]
    np.testing.assert_allclose(trace.tokens_W, trace.counts_WLE[:, 0].sum(axis=1) / 8)
    assert trace.tokens_W[0] == 208_896
    assert trace.metadata["model"] == "allenai/OLMoE-1B-7B-0924"
    assert trace.metadata["engine"] == "transformers (offline)"
    assert trace.metadata["source_commit"] == "357454f4f647385839c0ff6b99a688dc7cd9c13f"
    assert "Apache-2.0" in trace.metadata["licence"]


def test_example_script_rebuilds_the_embedded_trace(shared_traces, tmp_path):
    spec = importlib.util.spec_from_file_location("make_olmoe_trace", REPO / "examples" / "make_olmoe_trace.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--output", str(tmp_path / "olmoe.safetensors")])
    rebuilt, shipped = load_trace(tmp_path / "olmoe.safetensors"), load_trace(EXAMPLE_TRACE)
    np.testing.assert_array_equal(rebuilt.counts_WLE, shipped.counts_WLE)
    assert rebuilt.metadata == shipped.metadata


def test_reading_json_does_not_import_torch(tmp_path):
    path = tmp_path / "stat.json"
    path.write_text(json.dumps({"logical_count": deepseek_counts(1)[0].tolist()}))
    code = f"import sys; from moeplace.readers import load_trace; load_trace({str(path)!r}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- bad input: one test per case


def balancer_yaml(path: Path, assignments: dict[int, list[int]], slots: int, updates: int = 0) -> Path:
    """The load-balancer YAML as `moeplace export --format trtllm` (and TensorRT-LLM's example) writes it."""
    lines = [f"num_slots: {slots}", f"layer_updates_per_iter: {updates}", "initial_global_assignments:"]
    lines += [f"  {layer}: {json.dumps(row)}" for layer, row in assignments.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trtllm_slot_statistics_fold_to_experts(tmp_path):
    # DeepSeek-like: 256 experts in 288 slots; TensorRT-LLM counts slot ids and says num_experts 288
    layers = [3, 4, 60]
    assignments = {layer: RNG.permutation(np.concatenate([np.arange(256), RNG.integers(0, 256, 32)])).tolist()
                   for layer in layers}
    slot_counts = RNG.integers(0, 30, size=(2, 2, 3, 288)).astype(np.int64)  # ranks, iterations, layers, slots
    folder = tmp_path / "stat"
    write_trtllm(folder, slot_counts, iters=[10, 11], layers=layers, top_k=8)
    config = balancer_yaml(tmp_path / "eplb.yaml", assignments, 288)
    trace = load_trace(folder, trtllm_config=config)
    assert trace.num_experts == 256 and trace.layers.tolist() == layers
    total = slot_counts.sum(axis=0)
    for l, layer in enumerate(layers):
        expected = np.zeros((2, 256))
        for slot, expert in enumerate(assignments[layer]):
            expected[:, expert] += total[:, l, slot]
        np.testing.assert_array_equal(trace.counts_WLE[:, l], expected)
    assert "288 load-balancer slots folded to 256 experts" in trace.metadata["folded"]
    with pytest.raises(ValueError, match="num_experts is 288 for DeepSeek's layers 3..60 of top-8.*--trtllm-config"):
        load_trace(folder)


def test_trtllm_fold_refuses_what_it_cannot_fold(tmp_path):
    layers = [3, 4]
    assignments = {layer: list(range(256)) + list(range(32)) for layer in layers}
    folder = tmp_path / "stat"
    write_trtllm(folder, np.ones((1, 1, 2, 288), dtype=np.int64), iters=[0], layers=layers, top_k=8)
    moving = balancer_yaml(tmp_path / "online.yaml", assignments, 288, updates=1)
    with pytest.raises(ValueError, match="layer_updates_per_iter is 1: the balancer moved experts"):
        load_trace(folder, trtllm_config=moving)
    other = balancer_yaml(tmp_path / "other.yaml", {3: list(range(256)) + list(range(64)), 4: list(range(320))[:320]}, 320)
    with pytest.raises(ValueError, match="num_experts is 288, neither the 320 slots"):
        load_trace(folder, trtllm_config=other)
    (tmp_path / "bad.yaml").write_text("num_slots: [1\n")
    with pytest.raises(ValueError, match="bad.yaml: not a readable YAML file"):
        load_trace(folder, trtllm_config=tmp_path / "bad.yaml")
    short = balancer_yaml(tmp_path / "short.yaml", {3: assignments[3]}, 288)
    with pytest.raises(ValueError, match="has no layer 4 of the statistic"):
        load_trace(folder, trtllm_config=short)
    # the balancer off: expert counts stay as they are
    plain = tmp_path / "plain"
    write_trtllm(plain, np.ones((1, 1, 2, 256), dtype=np.int64), iters=[0], layers=layers, top_k=8)
    assert load_trace(plain, trtllm_config=balancer_yaml(tmp_path / "e.yaml", assignments, 288)).num_experts == 256
