"""The fixed-capacity decode path (runtime/decode.py, EPMoE.decode_step, DecodeGraphs) against the
variable-size path on real ranks: 1, 2 and 4 gloo ranks (4 = 2 nodes x 2) forked from one process,
with and without replicas, batches from empty to full; a layout swapped in place under the graphs;
capacity overflow refused. On a GPU (marked): CUDA graphs on NCCL ranks, and no host sync."""

from __future__ import annotations

import json
import os

import pytest
import torch
from ranks_launch import LAYERS, launch, replicated

from moeplace.placement import save_placement, trivial_placement
from moeplace.runtime.decode import check_capacity
from moeplace.runtime.graphs import DecodeGraphs
from moeplace.runtime.tokenizer import ByteTokenizer
from moeplace.topology import Topology

WORKER = os.path.join(os.path.dirname(__file__), "decode_worker.py")
C = 12  # capacity (tokens per rank) of every scenario


def scenarios(out, device: str) -> list[dict]:
    layouts = {
        "w1": (trivial_placement(64, Topology(1, 1, 64), LAYERS, 4), replicated(1, 1, 64, seed=1), [C]),
        "w1-empty": (replicated(1, 1, 70, seed=2), replicated(1, 1, 70, seed=3), [0]),
        "w2-2nodes": (replicated(2, 1, 40, seed=10), replicated(2, 1, 40, seed=4, split=True), [5, 0]),
        "w2-trivial": (trivial_placement(64, Topology(2, 2, 32), LAYERS, 4), replicated(2, 2, 32, seed=11),
                       [C, 9]),
        "w4-trivial": (trivial_placement(64, Topology(4, 2, 16), LAYERS, 4), replicated(4, 2, 16, seed=5),
                       [C, 0, 3, C - 1]),
        "w4-replicas": (replicated(4, 2, 20, seed=6), replicated(4, 2, 20, seed=7, split=True), [7, C, 1, 0]),
        "w4-all-empty": (replicated(4, 2, 20, seed=8), replicated(4, 2, 20, seed=9), [0, 0, 0, 0]),
    }
    if device == "cuda":
        layouts = {k: v for k, v in layouts.items() if k[1] in "12"}
    jobs = []
    for i, (name, (before, after, tokens)) in enumerate(layouts.items()):
        save_placement(before, out / f"{name}.json")
        save_placement(after, out / f"{name}.after.json")
        jobs.append({"name": name, "world": len(tokens), "placement": str(out / f"{name}.json"),
                     "swap_to": str(out / f"{name}.after.json"), "capacity": C, "tokens": tokens, "seed": i})
    return jobs


def run(out, device: str, world: int, jobs: list[dict] | None = None) -> dict:
    jobs = jobs or scenarios(out, device)
    (out / "job.json").write_text(json.dumps({"device": device, "scenarios": jobs}))
    launch(world, out, WORKER)
    return {j["name"]: [torch.load(out / f"{j['name']}.rank{r}.pt") for r in range(j["world"])] for j in jobs}


@pytest.fixture(scope="module")
def cpu_ranks(tmp_path_factory):
    return run(tmp_path_factory.mktemp("decode"), "cpu", 4)


@pytest.mark.slow
def test_decode_equals_the_variable_path_exactly(cpu_ranks):
    for name, per_rank in cpu_ranks.items():
        for rank, r in enumerate(per_rank):
            where = f"{name} rank {rank}"
            assert r["decode"].shape == (C, 256), where
            n = r["variable"].shape[0]
            assert torch.equal(r["decode"][:n], r["variable"]), where
            assert not r["decode"][n:].any(), f"{where}: padding rows must come out zero"
            for counter in ("window_slots_GS", "slot_tokens_S"):
                same = torch.equal(r["decode_counts"][counter], r["variable_counts"][counter])
                assert same, f"{where} {counter}"
    loads = [r["variable_counts"]["slot_tokens_S"].sum() for r in cpu_ranks["w4-replicas"]]
    assert sum(loads) == 20 * 8 and min(loads) > 0  # the batches really crossed ranks


@pytest.mark.slow
def test_graph_runner_gives_the_layer_output_and_counts_once(cpu_ranks):
    for name, per_rank in cpu_ranks.items():
        for rank, r in enumerate(per_rank):
            assert torch.equal(r["layer_graph"], r["layer_eager"]) and r["graph_ids_ok"], f"{name} rank {rank}"
            # the shared expert's CPU matmuls round by row count (bucket vs batch): float tolerance only there
            torch.testing.assert_close(r["layer_graph"], r["layer_variable"], rtol=1e-5, atol=1e-6)
            # warm-up runs carry no live token: the recorder counts the batch once
            assert torch.equal(r["graph_counts"]["window_slots_GS"], r["variable_counts"]["window_slots_GS"])


@pytest.mark.slow
def test_layout_swapped_in_place_equals_a_layer_built_on_it(cpu_ranks):
    for name, per_rank in cpu_ranks.items():
        for rank, r in enumerate(per_rank):
            assert torch.equal(r["swapped_graph"], r["fresh_layer"]), f"{name} rank {rank}"


@pytest.mark.slow
def test_engine_decode_step_takes_the_fixed_capacity_path(tiny_dir, tmp_path):
    """EPModel.decode_step with a live mask (the MoE layers through `forward_decode`) gives the logits of
    the variable-size path, step after step, with the KV cache, on 2 ranks (2 nodes, replicas)."""
    save_placement(replicated(2, 1, 40, seed=12), tmp_path / "p.json")
    jobs = [{"name": "engine", "kind": "engine", "world": 2, "placement": str(tmp_path / "p.json"),
             "model_dir": str(tiny_dir), "sequences": 3, "steps": 3}]
    for rank, r in enumerate(run(tmp_path, "cpu", 2, jobs)["engine"]):
        assert len(r["fixed"]) == 3
        for step, (fixed, variable) in enumerate(zip(r["fixed"], r["variable"])):
            assert fixed.shape == variable.shape == (3, ByteTokenizer().vocab_size)
            assert torch.equal(fixed, variable), f"rank {rank} step {step}"


def test_capacity_overflow_is_refused():
    with pytest.raises(ValueError, match="13 tokens exceeds the step's capacity of 12"):
        check_capacity(13, 12)
    graphs = DecodeGraphs(lambda x, live: x, [4, 12], 8, torch.float32, torch.device("cpu"))
    assert graphs.bucket_for(0) == 4 and graphs.bucket_for(5) == 12
    with pytest.raises(ValueError, match="13 tokens exceeds the largest graph bucket"):
        graphs.bucket_for(13)
    with pytest.raises(ValueError, match="exceeds the step's bucket of 4"):
        graphs.run(torch.ones(5, 8), 4)
    with pytest.raises(ValueError, match="ascending"):
        DecodeGraphs(lambda x, live: x, [8, 4], 8, torch.float32, torch.device("cpu"))
    assert torch.equal(graphs.run(torch.ones(3, 8), 4), torch.ones(3, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_on_nccl_ranks(tmp_path):
    """FP8 kernel path, CUDA graphs (NCCL all_to_all inside them on 2 GPUs): the graph replays what the
    eager step computes, and the in-place swap keeps the graphs valid."""
    world = min(torch.cuda.device_count(), 2)
    results = run(tmp_path, "cuda", world)
    for name, per_rank in results.items():
        for rank, r in enumerate(per_rank):
            where = f"{name} rank {rank}"
            n = r["variable"].shape[0]
            # the variable path's grouped GEMMs may pick other tiles (fewer rows): FP8 tolerance, not bits
            torch.testing.assert_close(r["decode"][:n], r["variable"], rtol=2e-2, atol=2e-2, msg=where)
            torch.testing.assert_close(r["layer_graph"], r["layer_variable"], rtol=2e-2, atol=2e-2, msg=where)
            assert torch.equal(r["layer_graph"], r["layer_eager"]), where
            assert torch.equal(r["swapped_graph"], r["fresh_layer"]), where
            assert torch.equal(r["decode_counts"]["window_slots_GS"], r["variable_counts"]["window_slots_GS"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_never_syncs_with_the_host_and_graphs_capture_again():
    import importlib.util

    from moeplace.runtime.comm import Comm

    spec = importlib.util.spec_from_file_location("decode_worker", WORKER)
    decode_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_worker)
    moe = decode_worker.build(replicated(1, 1, 70, seed=2), Comm.of(None), torch.device("cuda"), seed=0)
    x = torch.randn(C, 256, device="cuda")
    x[7:] = 0  # padding as the graph runner pads
    live = torch.arange(C, device="cuda") < 7
    moe.forward_decode(x, live)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = moe.forward_decode(x, live).y_TD
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphs = DecodeGraphs(lambda x_, live_: moe.forward_decode(x_, live_).y_TD, [C], 256, torch.float32, x.device)
    first = graphs.run(x[:7], C).clone()
    graphs.drop()  # a re-capture (the alternative to swapping a layout in place) gets a fresh pool
    assert torch.equal(first, eager[:7]) and torch.equal(graphs.run(x[:7], C), eager[:7])
