"""Exporters: each file reads back with the engine's own parser (json / yaml / safetensors) and
holds exactly the placement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

from moeplace import __version__
from moeplace.placement import Placement, trivial_placement
from moeplace.placer.export import FORMATS, export_bytes, export_placement
from moeplace.topology import Topology

# vLLM's EplbState docstring example: 2 MoE layers, 4 logical experts, 6 slots on 3 EP ranks.
VLLM_PHY2LOG = [[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]]
VLLM_LOG2PHY = [
    [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]],
    [[0, 2, 4], [3, -1, -1], [1, -1, -1], [5, -1, -1]],
]
VLLM_COUNT = [[2, 2, 1, 1], [3, 1, 1, 1]]


def small_placement(phy2log=VLLM_PHY2LOG, layers=(3, 4), num_model_layers=6) -> Placement:
    topo = Topology(num_gpus=3, gpus_per_node=3, slots_per_gpu=2)
    return Placement(np.array(phy2log), 4, topo, np.array(layers), num_model_layers, provenance={"solver": "hand"})


def deepseek_placement(seed: int = 0) -> Placement:
    """DeepSeek-V3-like: MoE layers 3..60 of 61, 256 experts, EP32 x 9 slots, random replicas."""
    rng = np.random.default_rng(seed)
    E, P = 256, 288
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.choice(E, P - E)])) for _ in range(58)]
    topo = Topology(num_gpus=32, gpus_per_node=8, slots_per_gpu=9)
    return Placement(np.stack(rows), E, topo, np.arange(3, 61), 61)


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def check_inverse(phy2log_LP, log2phy_LER, count_LE) -> None:
    """log2phy lists exactly the slots phy2log assigns to each expert; counts sum to P."""
    L, P = phy2log_LP.shape
    assert (count_LE.sum(axis=1) == P).all()
    assert ((log2phy_LER != -1).sum(axis=2) == count_LE).all()
    for l in range(L):
        for e in range(log2phy_LER.shape[1]):
            slots = log2phy_LER[l, e][log2phy_LER[l, e] != -1]
            assert sorted(slots.tolist()) == np.flatnonzero(phy2log_LP[l] == e).tolist()


# --- SGLang ------------------------------------------------------------------------------------


def test_sglang_deepseek_has_61_rows_with_trivial_dense_rows(tmp_path):
    placement = deepseek_placement()
    export_placement(placement, "sglang", tmp_path / "loc.json")
    data = json.loads((tmp_path / "loc.json").read_text())
    assert list(data) == ["physical_to_logical_map"]  # SGLang passes the keys as **kwargs
    map_MP = np.array(data["physical_to_logical_map"])
    assert map_MP.shape == (61, 288)
    assert (map_MP[:3] == np.arange(288) % 256).all()
    assert (map_MP[3:] == placement.phy2log_LP).all()


def test_sglang_infers_layer_count_from_contiguous_layers(tmp_path):
    placement = small_placement(layers=(0, 1), num_model_layers=None)
    export_placement(placement, "sglang", tmp_path / "loc.json")
    assert json.loads((tmp_path / "loc.json").read_text()) == {"physical_to_logical_map": VLLM_PHY2LOG}


def test_sglang_argument_overrides_num_model_layers(tmp_path):
    export_placement(small_placement(), "sglang", tmp_path / "loc.json", num_model_layers=8)
    rows = json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"]
    trivial = [0, 1, 2, 3, 0, 1]
    assert rows == [trivial] * 3 + VLLM_PHY2LOG + [trivial] * 3


def test_sglang_without_layer_count_is_an_error_and_writes_nothing(tmp_path):
    placement = small_placement(num_model_layers=None)
    with pytest.raises(ValueError, match="give num_model_layers"):
        export_placement(placement, "sglang", tmp_path / "loc.json")
    assert list(tmp_path.iterdir()) == []


def test_num_model_layers_must_exceed_the_last_layer():
    with pytest.raises(ValueError, match="above the last placed layer 4, got 4"):
        export_bytes(small_placement(), "sglang", num_model_layers=4)


# --- TensorRT-LLM ------------------------------------------------------------------------------


def test_trtllm_yaml_keys_are_model_layer_ids(tmp_path):
    export_placement(small_placement(), "trtllm", tmp_path / "lb.yaml")
    text = (tmp_path / "lb.yaml").read_text()
    assert text.startswith(f"# moeplace {__version__} ")
    assert yaml.safe_load(text) == {
        "num_slots": 6,
        "layer_updates_per_iter": 0,
        "initial_global_assignments": {3: VLLM_PHY2LOG[0], 4: VLLM_PHY2LOG[1]},
    }


def test_trtllm_deepseek_assignments_cover_every_expert(tmp_path):
    placement = deepseek_placement(seed=1)
    export_placement(placement, "trtllm", tmp_path / "lb.yaml")
    config = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    assignments = config["initial_global_assignments"]
    assert list(assignments) == list(range(3, 61))
    for layer, row in zip(placement.layers, placement.phy2log_LP):
        assert assignments[layer] == row.tolist()
        assert set(assignments[layer]) == set(range(256))  # TensorRT-LLM asserts this


# --- vLLM and DeepSeek EPLB tensors ------------------------------------------------------------


def test_vllm_matches_its_docstring_example(tmp_path):
    export_placement(small_placement(), "vllm", tmp_path / "eplb.safetensors")
    t = load_file(tmp_path / "eplb.safetensors")
    assert set(t) == {"physical_to_logical_map", "logical_to_physical_map", "logical_replica_count"}
    assert all(v.dtype == np.int64 for v in t.values())
    assert t["physical_to_logical_map"].tolist() == VLLM_PHY2LOG
    assert t["logical_to_physical_map"].tolist() == VLLM_LOG2PHY
    assert t["logical_replica_count"].tolist() == VLLM_COUNT
    meta = metadata(tmp_path / "eplb.safetensors")
    assert meta["format"] == "moeplace.export.vllm"
    assert meta["moeplace_version"] == __version__
    assert json.loads(meta["layers"]) == [3, 4]
    assert meta["num_model_layers"] == "6"
    assert json.loads(meta["provenance"]) == {"solver": "hand"}


def test_vllm_pads_to_redundant_plus_one_and_eplb_to_max_count(tmp_path):
    placement = small_placement(phy2log=VLLM_PHY2LOG[:1], layers=(3,))
    export_placement(placement, "vllm", tmp_path / "v.safetensors")
    export_placement(placement, "eplb", tmp_path / "e.safetensors")
    assert load_file(tmp_path / "v.safetensors")["logical_to_physical_map"].tolist() == [VLLM_LOG2PHY[0]]
    assert load_file(tmp_path / "e.safetensors")["log2phy"].tolist() == [[[0, 4], [1, 5], [2, -1], [3, -1]]]


def test_eplb_tensors(tmp_path):
    export_placement(small_placement(), "eplb", tmp_path / "eplb.safetensors")
    t = load_file(tmp_path / "eplb.safetensors")
    assert set(t) == {"phy2log", "log2phy", "logcnt"}
    assert t["phy2log"].tolist() == VLLM_PHY2LOG
    assert t["log2phy"].tolist() == VLLM_LOG2PHY
    assert t["logcnt"].tolist() == VLLM_COUNT
    assert metadata(tmp_path / "eplb.safetensors")["format"] == "moeplace.export.eplb"


@pytest.mark.parametrize("fmt, names", [
    ("vllm", ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")),
    ("eplb", ("phy2log", "log2phy", "logcnt")),
])
def test_deepseek_tensors_are_consistent(tmp_path, fmt, names):
    placement = deepseek_placement(seed=2)
    export_placement(placement, fmt, tmp_path / "x.safetensors")
    t = load_file(tmp_path / "x.safetensors")
    phy2log, log2phy, count = (t[n] for n in names)
    assert phy2log.shape == (58, 288) and count.shape == (58, 256)
    assert (phy2log == placement.phy2log_LP).all()
    check_inverse(phy2log, log2phy, count)
    assert log2phy.shape[2] == (288 - 256 + 1 if fmt == "vllm" else count.max())


def test_trivial_placement_exports_identity(tmp_path):
    topo = Topology(num_gpus=2, gpus_per_node=2, slots_per_gpu=4)
    export_placement(trivial_placement(8, topo, np.arange(2)), "eplb", tmp_path / "out.safetensors")
    t = load_file(tmp_path / "out.safetensors")
    assert t["log2phy"].tolist() == [[[e] for e in range(8)]] * 2
    assert (t["logcnt"] == 1).all()


# --- errors ------------------------------------------------------------------------------------


def test_unknown_format_names_it_lists_choices_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'megatron'; choose one of: sglang, trtllm, vllm, eplb"):
        export_placement(small_placement(), "megatron", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_is_created(tmp_path):
    export_placement(small_placement(), "eplb", tmp_path / "nowhere" / "out.safetensors")
    assert (tmp_path / "nowhere" / "out.safetensors").stat().st_size > 0


def test_output_below_a_file_is_a_value_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="f is not a folder"):
        export_placement(small_placement(), "eplb", tmp_path / "f" / "out.safetensors")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_folder_is_a_value_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(ValueError, match="cannot write"):
            export_placement(small_placement(), "trtllm", folder / "lb.yaml")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_target_that_is_a_folder_is_a_value_error_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a folder, expected a file name"):
        export_placement(small_placement(), "vllm", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_export_keeps_the_previous_file(tmp_path):
    target = tmp_path / "loc.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        export_placement(small_placement(num_model_layers=None), "sglang", target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["loc.json"]


def test_formats_tuple():
    assert FORMATS == ("sglang", "trtllm", "vllm", "eplb")
