"""The command line through typer's CliRunner: every command, and bad input ending in one line + exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moeplace import __version__
from moeplace.cli import app
from moeplace.resources import EXAMPLE_TRACE
from moeplace.placement import load_placement, save_placement, trivial_placement
from moeplace.topology import Topology
from moeplace.trace import Trace, save_trace

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def solve_args(out: Path, *extra: str) -> list[str]:
    return ["solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10",
            "--time-limit", "2", "--workers", "1", "-o", out, *extra]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def solved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("solve") / "placement.json"
    result = run(*solve_args(out))
    assert result.exit_code == 0, result.output
    return out


def test_solve_writes_valid_placement_and_prints_bounds(solved):
    placement = load_placement(solved)
    assert placement.phy2log_LP.shape == (3, 80)
    assert placement.duplicate_replicas() == 0
    assert placement.provenance["solver"] == "moeplace-cpsat"
    assert len(placement.provenance["layers"]["bound"]) == 3


def test_solve_table_shows_every_layer_and_gap(tmp_path):
    result = run(*solve_args(tmp_path / "p.json", "--method", "greedy"))
    assert result.exit_code == 0, result.output
    for layer in ("0", "7", "15"):
        assert any(line.strip("│┃ ").startswith(layer) for line in result.output.splitlines())
    assert "gap" in result.output and "bound" in result.output


def test_solve_redundant_equals_slots(tmp_path):
    out = tmp_path / "p.json"
    args = solve_args(out, "--method", "greedy")
    args[args.index("--slots-per-gpu"): args.index("--slots-per-gpu") + 2] = ["--redundant", "16"]
    assert run(*args).exit_code == 0
    assert load_placement(out).topology.slots_per_gpu == 10


def test_solve_from_old_reports_moves(tmp_path, solved):
    out = tmp_path / "p2.json"
    result = run(*solve_args(out, "--from", solved))
    assert result.exit_code == 0, result.output
    assert "experts to move" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"moeplace {__version__}" and __version__[0].isdigit()


def test_solve_eplb_prints_numbers_not_nan(tmp_path):
    result = run(*solve_args(tmp_path / "p.json", "--method", "eplb"))
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower() and "eplb:3" in result.output


def test_evaluate_in_80_columns_shows_whole_trace_names(solved, tmp_path):
    names = [tmp_path / f"prefill_in{n}out1000_long_name.safetensors" for n in (1000, 2000)]
    for name in names:
        name.write_bytes(EXAMPLE_TRACE.read_bytes())
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["evaluate", str(solved), *map(str, names)])
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    for name in names:
        assert name.name in result.output

def test_evaluate_json(solved):
    result = run("evaluate", solved, EXAMPLE_TRACE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (score,) = data["traces"]
    assert 1.0 <= score["best_split_imbalance_mean"] <= score["imbalance_mean"]
    assert len(score["imbalance_per_layer"]) == 3
    assert "worst_window_imbalance_mean" in score  # the example has six windows


def test_evaluate_table_and_baseline(solved, tmp_path):
    trivial = tmp_path / "trivial.json"
    save_placement(trivial_placement(64, Topology(8, 4, 10), np.array([0, 7, 15]), 16), trivial)
    result = run("evaluate", solved, EXAMPLE_TRACE, "--baseline", trivial)
    assert result.exit_code == 0, result.output
    assert "balancedness" in result.output and "experts to move" in result.output


@pytest.mark.parametrize("fmt", ["sglang", "trtllm", "vllm", "eplb"])
def test_export_each_format(solved, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    result = run("export", solved, "--format", fmt, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    if fmt == "sglang":
        rows = json.loads(out.read_text())["physical_to_logical_map"]
        assert len(rows) == 16 and rows[7] == load_placement(solved).phy2log_LP[1].tolist()
    if fmt == "trtllm":
        assert yaml.safe_load(out.read_text())["num_slots"] == 80


def test_demo_runs():
    result = run("demo", "--offline", "--time-limit", "1")
    assert result.exit_code == 0, result.output
    for name in ("trivial", "eplb", "greedy", "cpsat", "held-out"):
        assert name in result.output


# -- bad input: one line, exit 1, nothing written ------------------------------------------------

def test_missing_trace(tmp_path):
    out = tmp_path / "p.json"
    result = run("solve", tmp_path / "nope.json", "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10", "-o", out)
    assert_one_line_error(result, "nope.json", "not found")
    assert not out.exists()


def test_nan_counts(tmp_path):
    bad = tmp_path / "bad.json"
    rows = np.ones((61, 256)).tolist()
    rows[5][7] = float("nan")
    bad.write_text(json.dumps({"logical_count": rows}).replace("NaN", "NaN"))
    out = tmp_path / "p.json"
    result = run("solve", bad, "--gpus", "8", "--gpus-per-node", "8", "--slots-per-gpu", "36", "-o", out)
    assert_one_line_error(result, "bad.json", "NaN")
    assert not out.exists()


def test_negative_counts_in_native_trace(tmp_path):
    path = tmp_path / "neg.safetensors"
    counts = np.ones((1, 2, 8))
    save_trace(Trace(counts, np.array([0, 1]), 2, source="x"), path)
    # corrupt a value on disk through the safetensors API: write a trace with a negative entry
    from safetensors.numpy import load_file, save_file
    from moeplace.trace import _safetensors_metadata
    meta = _safetensors_metadata(path.read_bytes(), str(path))
    tensors = load_file(path)
    tensors["counts_WLE"][0, 1, 3] = -4.0
    save_file(tensors, path, metadata=meta)
    result = run("solve", path, "--gpus", "2", "--gpus-per-node", "2", "--slots-per-gpu", "4", "-o", tmp_path / "p.json")
    assert_one_line_error(result, "neg.safetensors", "negative")


def test_fewer_slots_than_experts(tmp_path):
    out = tmp_path / "p.json"
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "7", "-o", out)
    assert_one_line_error(result, "56 slots", "64 experts")
    assert not out.exists()


def test_redundant_not_dividing(tmp_path):
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--redundant", "3", "-o", tmp_path / "p.json")
    assert_one_line_error(result, "67 slots", "8 GPUs")


def test_both_slot_options(tmp_path):
    result = run("solve", EXAMPLE_TRACE, "--gpus", "8", "--gpus-per-node", "4", "--redundant", "16", "--slots-per-gpu", "10",
                 "-o", tmp_path / "p.json")
    assert_one_line_error(result, "exactly one of --slots-per-gpu and --redundant")


def test_memory_budget_too_small(tmp_path):
    result = run(*solve_args(tmp_path / "p.json", "--memory-budget-gb", "0.1"))
    assert_one_line_error(result, "exceeds the GPU memory budget")


def test_trace_expert_count_mismatch_with_from(tmp_path, solved):
    other = tmp_path / "other.safetensors"
    save_trace(Trace(np.ones((1, 3, 32)), np.array([0, 7, 15]), 8, source="o"), other)
    result = run("solve", other, "--gpus", "8", "--gpus-per-node", "4", "--slots-per-gpu", "10", "--from", solved,
                 "-o", tmp_path / "p.json")
    assert_one_line_error(result, "64 experts")


def test_placement_missing_an_expert(tmp_path, solved):
    data = json.loads(Path(solved).read_text())
    data["phy2log"][1] = [0] * 80
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = run("evaluate", bad, EXAMPLE_TRACE)
    assert_one_line_error(result, "bad.json", "layer 7", "no replica of expert 1")


def test_placement_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(run("export", bad, "--format", "sglang", "-o", tmp_path / "x.json"), "bad.json", "not valid JSON")
    assert not (tmp_path / "x.json").exists()


def test_unknown_export_format(tmp_path, solved):
    out = tmp_path / "x"
    assert_one_line_error(run("export", solved, "--format", "onnx", "-o", out), "onnx")
    assert not out.exists()


def test_evaluate_trace_for_other_model(tmp_path, solved):
    other = tmp_path / "other.safetensors"
    save_trace(Trace(np.ones((1, 3, 32)), np.array([0, 7, 15]), 8, source="o"), other)
    assert_one_line_error(run("evaluate", solved, other), "other.safetensors", "32 experts")


def test_output_folder_missing_is_created(tmp_path):
    out = tmp_path / "no" / "such" / "p.json"
    result = run(*solve_args(out, "--method", "greedy"))
    assert result.exit_code == 0, result.output
    assert load_placement(out).num_experts == 64


def test_output_under_a_file_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run(*solve_args(tmp_path / "file" / "p.json", "--method", "greedy"))
    assert_one_line_error(result, "file is not a folder")


def test_report(solved, tmp_path):
    out = tmp_path / "report.html"
    result = run("report", EXAMPLE_TRACE, "--placement", solved, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.exists() and "data:image/png;base64" in out.read_text()
    assert len(list(tmp_path.glob("report_*.png"))) >= 3


def test_report_several_traces_into_a_new_folder(solved, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(EXAMPLE_TRACE.read_bytes())
    out = tmp_path / "new" / "report.html"
    result = run("report", EXAMPLE_TRACE, other, "--placement", solved, "-o", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "olmoe_routing:arxiv" in page and "other:tulu" in page  # 2 x 6 windows, named by file


def test_report_traces_of_two_models_is_one_line_error(tmp_path):
    other = tmp_path / "other.safetensors"
    save_trace(Trace(np.ones((1, 3, 32)), np.array([0, 7, 15]), 8, source="o"), other)
    result = run("report", EXAMPLE_TRACE, other, "-o", tmp_path / "r.html")
    assert_one_line_error(result, "other.safetensors", "32 experts", "not the model of")
    assert not (tmp_path / "r.html").exists()


def test_report_placement_for_other_model(tmp_path):
    other = tmp_path / "other.json"
    save_placement(trivial_placement(32, Topology(4, 2, 8), np.array([0, 7, 15]), 16), other)
    out = tmp_path / "r.html"
    assert_one_line_error(run("report", EXAMPLE_TRACE, "--placement", other, "-o", out), "other.json", "32")
    assert not out.exists()
