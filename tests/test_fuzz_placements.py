"""Placement JSON fuzzed, and the CLI (`evaluate`, `solve`, `export`) on fuzzed traces and placements:
the library answers each with a valid object or a ValueError (never another exception, never a
multi-gigabyte allocation); the CLI exits 0, or 1 with one line on stderr, no traceback and no output
file. The valid files mutated here: tests/support/fuzz_bases.py; the trace readers: test_fuzz_traces.py.
Hypothesis is derandomized: the same inputs every run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# base and report are the module's fixtures: pytest finds them by their names here.
from fuzz_bases import E, LAYERS, RNG, TOP_K, base, placement_dict, report, trtllm_folder  # noqa: F401
from fuzzing import CLI_FUZZ, DEEP, FUZZ, cli, library, mutated_bytes, mutated_json, write
from moeplace.placement import load_placement
from moeplace.trace import Trace, trace_to_bytes


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
