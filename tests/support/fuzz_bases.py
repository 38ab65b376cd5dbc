"""The valid files the file fuzz tests mutate (test_fuzz_traces.py, test_fuzz_placements.py), and their
module fixtures: the files written once, and the memory check around each module's fuzzing."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from fuzzing import TRIED, write
from moeplace.placement import load_placement, placement_to_json, trivial_placement
from moeplace.readers import load_trace
from moeplace.topology import Topology
from moeplace.trace import Trace, trace_to_bytes


# The data every valid file describes: 8 experts on MoE layers 1..3 of a 4-layer model, top-2,
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
