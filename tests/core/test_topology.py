"""The data model's Topology: each constraint feasible and infeasible, every error message pinned."""

from __future__ import annotations

import re

import pytest

from moeplace.topology import Topology


def raises(message: str):
    return pytest.raises(ValueError, match=re.escape(message))


# ---------------------------------------------------------------- Topology


def test_topology_gpus_must_fill_whole_nodes():
    topo = Topology(num_gpus=8, gpus_per_node=4, slots_per_gpu=2)
    assert (topo.num_nodes, topo.num_slots) == (2, 16)
    with raises("topology: num_gpus 6 is not a multiple of gpus_per_node 4"):
        Topology(num_gpus=6, gpus_per_node=4, slots_per_gpu=2)


def test_topology_memory_budget_feasible_and_infeasible():
    Topology(num_gpus=2, gpus_per_node=2, slots_per_gpu=3, expert_bytes=100, gpu_memory_budget=300)
    with raises(
        "topology: 3 slots per GPU x 100 bytes per expert = 300 bytes exceeds the GPU memory budget "
        "of 299 bytes (it fits 2 slots)"
    ):
        Topology(num_gpus=2, gpus_per_node=2, slots_per_gpu=3, expert_bytes=100, gpu_memory_budget=299)


@pytest.mark.parametrize("field", ["num_gpus", "gpus_per_node", "slots_per_gpu", "expert_bytes"])
@pytest.mark.parametrize("bad", [0, -2, True, 2.0])
def test_topology_counts_must_be_positive_integers(field, bad):
    args = {"num_gpus": 4, "gpus_per_node": 2, "slots_per_gpu": 3, field: bad}
    with raises(f"topology: field '{field}' must be a positive integer, got {bad!r}"):
        Topology(**args)


@pytest.mark.parametrize("field", ["nvlink_gbps", "network_gbps"])
def test_topology_bandwidth_must_be_positive(field):
    with raises(f"topology: field '{field}' must be positive, got 0.0"):
        Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=3, **{field: 0.0})


def test_topology_build_from_redundant_count():
    topo = Topology.build(num_gpus=32, gpus_per_node=8, num_experts=256, redundant=32)
    assert (topo.slots_per_gpu, topo.num_slots, topo.num_nodes) == (9, 288, 4)
    with raises("256 experts + 30 redundant = 286 slots do not divide over 32 GPUs"):
        Topology.build(num_gpus=32, gpus_per_node=8, num_experts=256, redundant=30)
    with raises("--redundant must be >= 0, got -1"):
        Topology.build(num_gpus=32, gpus_per_node=8, num_experts=256, redundant=-1)


def test_topology_build_needs_a_slot_per_expert():
    assert Topology.build(num_gpus=4, gpus_per_node=2, num_experts=16, slots_per_gpu=4).num_slots == 16
    with raises("12 slots (4 GPUs x 3) are fewer than the 16 experts: every expert needs at least one slot"):
        Topology.build(num_gpus=4, gpus_per_node=2, num_experts=16, slots_per_gpu=3)


def test_topology_build_takes_exactly_one_of_slots_and_redundant():
    with raises("give exactly one of --slots-per-gpu and --redundant"):
        Topology.build(num_gpus=4, gpus_per_node=2, num_experts=16)
    with raises("give exactly one of --slots-per-gpu and --redundant"):
        Topology.build(num_gpus=4, gpus_per_node=2, num_experts=16, slots_per_gpu=4, redundant=0)


def test_topology_dict_round_trip_and_errors():
    topo = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=3, gpu_memory_budget=10**12)
    assert Topology.from_dict(topo.to_dict()) == topo
    with raises("f.json: unknown topology field(s) ['gpus']"):
        Topology.from_dict({**topo.to_dict(), "gpus": 4}, "f.json")
    data = topo.to_dict()
    del data["slots_per_gpu"]
    with raises("f.json: topology field 'slots_per_gpu' is missing"):
        Topology.from_dict(data, "f.json")
    with raises("f.json: topology: num_gpus 3 is not a multiple of gpus_per_node 2"):
        Topology.from_dict({**topo.to_dict(), "num_gpus": 3}, "f.json")
    with raises("f.json: 'topology' must be an object, got list"):
        Topology.from_dict([4, 2, 3], "f.json")
