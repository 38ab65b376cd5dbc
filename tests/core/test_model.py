"""The data model's Placement (and its JSON file; Topology: test_topology.py, Trace: test_trace.py). Each
constraint has a feasible and an infeasible case, and every error message is pinned: it must name the
quantity and its value."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplace import fileio
from moeplace.placement import (
    Placement,
    load_placement,
    placement_from_dict,
    placement_to_json,
    save_placement,
    trivial_placement,
)
from moeplace.topology import Topology

RNG = np.random.default_rng(11)


def raises(message: str):
    return pytest.raises(ValueError, match=re.escape(message))


# ---------------------------------------------------------------- Placement

TOPO = Topology(num_gpus=2, gpus_per_node=2, slots_per_gpu=2)


def test_placement_every_expert_needs_a_replica():
    ok = Placement(np.array([[0, 1, 2, 0], [2, 1, 0, 1]]), 3, TOPO, np.array([3, 5]))
    assert ok.replica_count_LE.tolist() == [[2, 1, 1], [1, 2, 1]]
    with raises("placement: layer 5 has no replica of expert 2 (1 expert(s) missing in all)"):
        Placement(np.array([[0, 1, 2, 0], [0, 1, 1, 1]]), 3, TOPO, np.array([3, 5]))
    with raises("placement: layer 3 has no replica of expert 1 (3 expert(s) missing in all)"):
        Placement(np.array([[0, 0, 0, 0], [0, 0, 0, 2]]), 3, TOPO, np.array([3, 5]))


@pytest.mark.parametrize("bad, where", [(3, [0, 3]), (-1, [0, 3])])
def test_placement_expert_ids_in_range(bad, where):
    with raises(f"placement: field 'phy2log' holds {bad} at index {where}, outside [0, 3)"):
        Placement(np.array([[0, 1, 2, bad]]), 3, TOPO, np.array([0]))


def test_placement_needs_one_expert_per_slot():
    with raises("placement: field 'phy2log' has shape [1, 5], expected 4 along axis 1"):
        Placement(np.array([[0, 1, 2, 0, 1]]), 3, TOPO, np.array([0]))
    with raises("placement: field 'phy2log' must have 2 dimensions, got shape [4]"):
        Placement(np.array([0, 1, 2, 0]), 3, TOPO, np.array([0]))


def test_placement_layers_increasing_and_below_model_layers():
    phy2log = np.array([[0, 1, 2, 0], [0, 1, 2, 2]])
    Placement(phy2log, 3, TOPO, np.array([3, 4]), num_model_layers=5)
    with raises("placement: field 'layers' must be non-negative and increasing, got [4, 4]"):
        Placement(phy2log, 3, TOPO, np.array([4, 4]))
    with raises("placement: layer id 4 is not below num_model_layers 4"):
        Placement(phy2log, 3, TOPO, np.array([3, 4]), num_model_layers=4)


def test_placement_split_sums_to_one_per_expert():
    phy2log = np.array([[0, 1, 2, 0]])
    ok = Placement(phy2log, 3, TOPO, np.array([3]), split_LP=np.array([[0.25, 1.0, 1.0, 0.75]]))
    assert ok.split_LP.dtype == np.float64
    with raises("placement: split of expert 0 in layer 3 sums to 0.900000, not 1"):
        Placement(phy2log, 3, TOPO, np.array([3]), split_LP=np.array([[0.25, 1.0, 1.0, 0.65]]))
    with raises("placement: field 'split' holds negative count -0.25 at index [0, 0]"):
        Placement(phy2log, 3, TOPO, np.array([3]), split_LP=np.array([[-0.25, 1.0, 1.0, 1.25]]))


def test_duplicate_replicas_counts_copies_sharing_a_gpu():
    p = Placement(np.array([[0, 0, 1, 2], [0, 1, 2, 0]]), 3, TOPO, np.array([0, 1]))
    assert p.duplicate_replicas() == 1
    assert p.gpu_of_slot().tolist() == [0, 0, 1, 1]


def random_placement(rng: np.random.Generator, with_split: bool) -> Placement:
    E, L = int(rng.integers(3, 20)), int(rng.integers(1, 5))
    G = int(rng.integers(1, 5))
    topo = Topology(num_gpus=G * 2, gpus_per_node=2, slots_per_gpu=int(rng.integers(-(-E // (G * 2)), E + 1)))
    P = topo.num_slots
    phy2log = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, P - E)])) for _ in range(L)])
    split = None
    if with_split:
        split = rng.random((L, P)) + 0.01
        sums = np.zeros((L, E))
        np.add.at(sums, (np.arange(L)[:, None], phy2log), split)
        split = split / np.take_along_axis(sums, phy2log, axis=1)
    layers = np.sort(rng.choice(60, L, replace=False)) + 1
    return Placement(phy2log, E, topo, layers, 61, split, provenance={"solver": "random", "seed": 3})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), with_split=st.booleans())
def test_log2phy_and_replica_count_agree_with_phy2log(seed, with_split):
    p = random_placement(np.random.default_rng(seed), with_split)
    L, E = p.num_layers, p.num_experts
    assert p.log2phy_LER.shape == (L, E, p.replica_count_LE.max())
    for l in range(L):
        for e in range(E):
            slots = np.flatnonzero(p.phy2log_LP[l] == e)
            assert p.replica_count_LE[l, e] == len(slots) >= 1
            row = p.log2phy_LER[l, e]
            assert row[: len(slots)].tolist() == slots.tolist()
            assert (row[len(slots):] == -1).all()


def assert_same_placement(a: Placement, b: Placement) -> None:
    np.testing.assert_array_equal(a.phy2log_LP, b.phy2log_LP)
    np.testing.assert_array_equal(a.layers, b.layers)
    assert (a.num_experts, a.num_model_layers, a.topology, a.provenance) == (
        b.num_experts, b.num_model_layers, b.topology, b.provenance)
    if a.split_LP is None:
        assert b.split_LP is None
    else:
        np.testing.assert_array_equal(a.split_LP, b.split_LP)  # exact, not approximately


@pytest.mark.parametrize("with_split", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_placement_json_round_trip_is_exact(tmp_path, with_split, seed):
    p = random_placement(np.random.default_rng(100 + seed), with_split)
    path = tmp_path / "placement.json"
    save_placement(p, path)
    back = load_placement(path)
    assert_same_placement(p, back)
    assert back.source == str(path)
    assert json.loads(path.read_text())["format"] == "moeplace.placement"
    assert path.read_text() == placement_to_json(back)


def test_placement_json_is_one_line_per_layer(tmp_path):
    p = trivial_placement(3, TOPO, np.array([3, 4, 5]))
    text = placement_to_json(p)
    assert "  [0, 1, 2, 0],\n  [0, 1, 2, 0],\n  [0, 1, 2, 0]\n" in text


def valid_dict() -> dict:
    p = Placement(np.array([[0, 1, 2, 0], [2, 1, 0, 1]]), 3, TOPO, np.array([3, 4]), 5,
                  split_LP=np.array([[0.5, 1.0, 1.0, 0.5], [1.0, 0.5, 1.0, 0.5]]))
    return json.loads(placement_to_json(p))


def test_placement_from_dict_accepts_a_valid_object():
    p = placement_from_dict(valid_dict(), "x.json")
    assert p.phy2log_LP.dtype == np.int64 and p.split_LP.tolist()[0] == [0.5, 1.0, 1.0, 0.5]
    data = valid_dict()
    data["phy2log"] = [[0.0, 1.0, 2.0, 0.0], [2.0, 1.0, 0.0, 1.0]]  # integral floats are integers
    assert placement_from_dict(data, "x.json").phy2log_LP.tolist() == [[0, 1, 2, 0], [2, 1, 0, 1]]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="sglang"), "x.json: field 'format' is 'sglang', expected 'moeplace.placement'"),
        (lambda d: d.pop("format"), "x.json: field 'format' is None, expected 'moeplace.placement'"),
        (lambda d: d.update(format_version=2), "x.json: format_version 2 is not supported (reads 1)"),
        (lambda d: d.update(format_version="1"), "x.json: format_version '1' is not supported (reads 1)"),
        (lambda d: d.pop("num_experts"), "x.json: field 'num_experts' is missing"),
        (lambda d: d.pop("layers"), "x.json: field 'layers' is missing"),
        (lambda d: d.pop("topology"), "x.json: field 'topology' is missing"),
        (lambda d: d.pop("phy2log"), "x.json: field 'phy2log' is missing"),
        (lambda d: d.update(phy2log=[[0, 1, 2, 0], [2, 1, 0]]), "x.json: field 'phy2log' is ragged (rows of different lengths)"),
        (lambda d: d.update(phy2log=[[0, 1, 2, 0], [2, 1, 0, 1.5]]), "x.json: field 'phy2log' must hold integers"),
        (lambda d: d.update(phy2log=[[0, 1, 2, 0], [2, 1, 0, "1"]]), "x.json: field 'phy2log' must hold only numbers"),
        (lambda d: d.update(phy2log=[[0, 1, 2, 0], [2, 1, 0, None]]), "x.json: field 'phy2log' must hold only numbers"),
        (lambda d: d.update(phy2log=[[0, 1, 2, 0], [2, True, 0, 1]]), "x.json: field 'phy2log' must hold only numbers"),
        (lambda d: d.update(phy2log=[[False, True, True, False]] * 2), "x.json: field 'phy2log' must hold only numbers"),
        (lambda d: d.update(layers=[3, True]), "x.json: field 'layers' must hold only numbers"),
        (lambda d: d.update(split=[[0.5, 1, 1, 0.5], [1, 0.5, 1, True]]), "x.json: field 'split' must hold only numbers"),
        (lambda d: d.update(split=[[0.5, 1, 1, 0.5], [1, 0.5, 1]]), "x.json: field 'split' is ragged"),
        (lambda d: d.update(num_experts=True), "x.json: field 'num_experts' must be a positive integer, got True"),
        (lambda d: d.update(num_experts="3"), "x.json: field 'num_experts' must be a positive integer, got '3'"),
        (lambda d: d.update(num_model_layers=2.5), "x.json: field 'num_model_layers' must be a positive integer, got 2.5"),
        (lambda d: d.update(provenance=[1]), "x.json: field 'provenance' must be an object"),
        (lambda d: d["topology"].pop("num_gpus"), "x.json: topology field 'num_gpus' is missing"),
        (lambda d: d["topology"].update(slots_per_gpu=True), "x.json: topology: field 'slots_per_gpu' must be a positive integer, got True"),
        (lambda d: d["topology"].update(slots_per_gpu=3), "x.json: field 'phy2log' has shape [2, 4], expected 6 along axis 1"),
        (lambda d: d.update(phy2log=[[0, 1, 1, 0], [2, 1, 0, 1]]), "x.json: layer 3 has no replica of expert 2"),
    ],
)
def test_placement_from_dict_errors(change, message):
    data = valid_dict()
    change(data)
    with raises(message):
        placement_from_dict(data, "x.json")


def test_placement_from_dict_needs_an_object():
    with raises("x.json: a placement must be a JSON object"):
        placement_from_dict([1, 2], "x.json")


def test_load_placement_bad_files(tmp_path):
    missing = tmp_path / "missing.json"
    with raises(f"{missing}: no such file"):
        load_placement(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ')
    with pytest.raises(ValueError, match=re.escape(f"{broken}: not valid JSON")):
        load_placement(broken)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=re.escape(f"{binary}: cannot read")):
        load_placement(binary)


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    target = tmp_path / "placement.json"
    good = trivial_placement(3, TOPO, np.array([0]))
    save_placement(good, target)
    before = target.read_text()

    # A placement that cannot be serialised never touches the file system.
    bad = good.with_provenance(note=object())
    with pytest.raises(TypeError):
        save_placement(bad, tmp_path / "new.json")
    assert sorted(os.listdir(tmp_path)) == ["placement.json"]

    # A write that fails before the rename leaves the old file whole and no temporary behind.
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    other = Placement(np.array([[2, 1, 0, 0]]), 3, TOPO, np.array([0]))
    with pytest.raises(OSError, match="disk full"):
        save_placement(other, target)
    assert sorted(os.listdir(tmp_path)) == ["placement.json"]
    assert target.read_text() == before


def test_write_into_a_missing_folder_creates_it(tmp_path):
    target = tmp_path / "new" / "folder" / "p.json"
    save_placement(trivial_placement(3, TOPO, np.array([0])), target)
    assert load_placement(target).num_experts == 3


def test_write_below_a_file_names_it(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "p.json"
    with raises(f"{target}: {tmp_path / 'file'} is not a folder"):
        save_placement(trivial_placement(3, TOPO, np.array([0])), target)


def test_saved_file_has_the_default_mode(tmp_path):
    target = tmp_path / "p.json"
    save_placement(trivial_placement(3, TOPO, np.array([0])), target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
