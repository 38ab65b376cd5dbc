"""The reshard's parts one by one, in one process: EPMoE's slots (`read_slot`, `install` in place), the
checksum, the options and fault-plan parsing, and the typed JobStatus both sides of HTTP use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplace.placement import Placement, trivial_placement
from moeplace.reshard_job import JobState, JobStatus, PhaseSeconds
from moeplace.runtime.model import EPModel
from moeplace.runtime.reshard_check import LayerChecks
from moeplace.runtime.reshard_faults import Fault, FaultKind, FaultPlan
from moeplace.runtime.reshard_jobs import JobRegistry, ReshardBusy
from moeplace.runtime.reshard_options import ReshardOptions, default_staging
from moeplace.runtime.reshard_wire import expert_sums
from moeplace.runtime.slots import SlotWeights, StagedLayer, as_words
from moeplace.topology import Topology


@pytest.fixture(scope="module")
def model(tiny_dir):
    """One process, 72 slots: slots 64..71 hold second copies of experts 0..7."""
    placement = trivial_placement(64, Topology(1, 1, 72), np.array([1, 2, 3]), 4)
    return EPModel.load(tiny_dir, placement, group=None, device=torch.device("cpu"))


def test_install_writes_in_place_and_swaps_routing(model):
    moe, placement = model.moe_layers[0], model.placement
    S = moe.w13_SFD.shape[0]
    pointers = [t.data_ptr() for t in (*moe.read_slot(slice(None)).tensors(), moe.slot_experts_S, moe.phy2log_P,
                                       moe.table.log2phy_ER)]
    # slots 0 and 1 trade experts; slot 2 takes a second copy of slot 1's (a fan-out of one buffer)
    before = [moe.read_slot(s) for s in range(3)]
    buffers = SlotWeights.empty_like(before[0], 2)
    for i, s in enumerate((1, 0)):
        for out, src in zip(buffers.row(i).tensors(), before[s].tensors()):
            out.copy_(src)
    expected = [[t.clone() for t in before[s].tensors()] for s in (1, 0, 0)]
    new_P = placement.phy2log_LP[0].copy()
    new_P[[0, 1, 2]] = new_P[[1, 0, 0]]
    staged = StagedLayer(buffers, np.array([0, 1]), np.array([2]), np.array([1]), new_P)
    phy2log_LP = placement.phy2log_LP.copy()
    phy2log_LP[0] = new_P  # expert 2 keeps its copy in slot 66
    new = Placement(phy2log_LP, placement.num_experts, placement.topology, placement.layers)
    moe.install(staged, new)
    for s in range(3):
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(moe.read_slot(s).tensors(), expected[s]))
    assert moe.slot_experts_S.tolist() == new_P[:S].tolist() and moe.phy2log_P.tolist() == new_P.tolist()
    assert pointers == [t.data_ptr() for t in (*moe.read_slot(slice(None)).tensors(), moe.slot_experts_S,
                                               moe.phy2log_P, moe.table.log2phy_ER)]
    assert placement.phy2log_LP[0, 0] != new_P[0]  # the model's placement array was not written through


def test_checksum_catches_one_flipped_byte_and_a_swap_of_experts():
    torch.manual_seed(0)
    experts = SlotWeights(*(torch.randint(0, 256, shape, dtype=torch.uint8) for shape in
                            ((3, 8, 16), (3, 2, 2), (3, 16, 8), (3, 1, 1))))  # the last: 1 byte, no 64-bit word
    sums = expert_sums(experts)
    assert len(set(sums.tolist())) == 3
    experts.w2[1].view(-1)[37] ^= 0x01
    changed = expert_sums(experts)
    assert (changed != sums).tolist() == [False, True, False]
    assert as_words(experts.w13).dtype == torch.int64 and as_words(experts.w2_sinv).dtype == torch.uint8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the check stream needs a CUDA GPU"))])
def test_layer_checks_as_pieces_land_equal_expert_sums(device):
    """LayerChecks (on a GPU: per piece, on a check stream; on CPU: at the end) give expert_sums of the
    staged rows, the received ones after the fault hook ran on them (here: a flipped byte)."""
    torch.manual_seed(0)
    n, n_local = 10, 3
    buffers = SlotWeights(*(torch.randint(0, 256, shape, dtype=torch.uint8).to(device) for shape in
                            ((n, 8, 16), (n, 2, 4), (n, 16, 8), (n, 1, 1))))
    clean = expert_sums(buffers).cpu().numpy()
    seen = []

    def received(rows):  # as a CORRUPT fault does: one byte of each received expert's weights
        seen.append(rows.w13.shape[0])
        rows.w13.reshape(rows.w13.shape[0], -1)[:, 5] ^= 0x5A

    stream = torch.cuda.Stream(device) if device == "cuda" else None
    checks = LayerChecks(buffers, n_local, received, stream, slots=16)
    checks.landed(7, 10, [])
    checks.local_gathered()
    checks.landed(3, 7, [])
    checks.close()
    sums = checks.sums()
    assert sorted(seen) == ([3, 4] if device == "cuda" else [7])  # per piece, or all received rows at once
    assert np.array_equal(sums, expert_sums(buffers).cpu().numpy())
    assert (sums != clean).tolist() == [False] * n_local + [True] * (n - n_local)


STREAMS = "MOEPLACE_RESHARD_COPY_STREAMS must be a whole number from 1 to 16, got"


@pytest.mark.parametrize("env, message", [
    ({"MOEPLACE_RESHARD_RATE": "-1"}, "MOEPLACE_RESHARD_RATE must be a number >= 0, got '-1'"),
    ({"MOEPLACE_RESHARD_STAGING": "0"}, "MOEPLACE_RESHARD_STAGING must be a positive number, got '0'"),
    ({"MOEPLACE_RESHARD_COPY_ENGINE": "yes"}, "MOEPLACE_RESHARD_COPY_ENGINE must be 0 or 1, got 'yes'"),
    ({"MOEPLACE_RESHARD_COPY_STREAMS": "0"}, f"{STREAMS} '0'"),
    ({"MOEPLACE_RESHARD_COPY_STREAMS": "2.5"}, f"{STREAMS} '2.5'"),
    ({"MOEPLACE_RESHARD_COPY_BATCH": "2"}, "MOEPLACE_RESHARD_COPY_BATCH must be 0 or 1, got '2'"),
    ({"MOEPLACE_RESHARD_PRIORITY": "high"}, "MOEPLACE_RESHARD_PRIORITY must be 0 or 1, got 'high'"),
])
def test_bad_options_are_one_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        ReshardOptions.from_env(env)


def test_options_from_env():
    options = ReshardOptions.from_env({"MOEPLACE_RESHARD_RATE": "5e10", "MOEPLACE_RESHARD_COPY_ENGINE": "1",
                                       "MOEPLACE_RESHARD_COPY_STREAMS": "2"})
    assert options.rate_bytes_per_s == 5e10 and options.copy_engine and options.chunk_experts == 8
    assert options.copy_streams == 2
    default = ReshardOptions.from_env({})
    assert default.rate_bytes_per_s == 0 and default.chunk_experts > 1000 and default.copy_engine
    assert default.copy_streams == 1 and default.copy_batch
    assert not ReshardOptions.from_env({"MOEPLACE_RESHARD_COPY_ENGINE": "0"}).copy_engine
    assert not ReshardOptions.from_env({"MOEPLACE_RESHARD_COPY_BATCH": "0"}).copy_batch
    # the reshard's streams at high priority unless asked not to (torch: lower is higher)
    assert default.stream_priority < 0
    assert ReshardOptions.from_env({"MOEPLACE_RESHARD_PRIORITY": "0"}).stream_priority == 0
    # staging: unset, the Resharder sizes it for two layers of the GPU's slots (at least 8 GiB)
    assert default.staging_bytes is None
    assert ReshardOptions.from_env({"MOEPLACE_RESHARD_STAGING": "1e9"}).staging_bytes == 10**9
    expert = 44_050_944  # DeepSeek-V3's FP8 expert with its scales
    assert default_staging(36, expert) == 8 << 30  # EP8: 36 slots a GPU, two layers well within 8 GiB
    assert default_staging(130, expert) == 2 * 130 * expert > 8 << 30  # EP2: a layer is 5.7 GB a GPU


def test_fault_plan_parse():
    plan = FaultPlan.parse("corrupt:2,-,stall:3:1,crash:1:0")
    assert plan.for_job(0) == Fault(FaultKind.CORRUPT, 2) and plan.for_job(2) == Fault(FaultKind.STALL, 3, 1)
    assert plan.for_job(3) == Fault(FaultKind.CRASH, 1, 0)
    assert plan.for_job(1) == plan.for_job(9)  # no fault
    for bad in ("boom:1", "fail:2", "corrupt:1:2", "stall:x:1", "crash:1"):
        with pytest.raises(ValueError, match=f"fault '{bad}'"):
            FaultPlan.parse(bad)


def test_job_status_round_trip_and_bad_fields():
    jobs = JobRegistry()
    job = jobs.open(3, 10, 100)
    with pytest.raises(ReshardBusy, match="still running"):
        jobs.open(3, 10, 100)
    jobs.add_layer(job.id, np.int64(4), 100)  # numpy counts stay plain ints in the JSON
    jobs.add_phase(job.id, "transfer", 0.25)
    jobs.update(job.id, rank_phase_seconds=(PhaseSeconds(transfer=0.25), PhaseSeconds(stage=0.5)))
    jobs.finish(job.id, JobState.DONE, 1.5, None)
    status = jobs.get(job.id)
    assert type(status.to_json()["experts_moved"]) is int
    assert JobStatus.from_json(status.to_json(), "x") == status and status.bandwidth_gbps == 400 / 1.5 / 1e9
    assert jobs.open(1, 1, 1).state is JobState.PENDING  # the finished job no longer blocks
    assert status.to_json()["rank_phase_seconds"][1]["stage"] == 0.5
    for field, value in (("state", "exploded"), ("layers_done", -1), ("phase_seconds", {"stage": 1}),
                         ("rank_phase_seconds", {"stage": 1}), ("rank_phase_seconds", [{"stage": 1}]),
                         ("error", 3), ("seconds", float("nan"))):
        with pytest.raises(ValueError, match=f"src: reshard status field '{field}' is invalid"):
            JobStatus.from_json({**status.to_json(), field: value}, "src")
    with pytest.raises(ValueError, match="src: reshard status has no field 'id'"):
        JobStatus.from_json({}, "src")
