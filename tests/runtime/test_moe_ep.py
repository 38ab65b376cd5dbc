"""EPModel against the single-process reference: 1 rank in process, 2 and 4 gloo ranks as subprocesses
launched the way torchrun launches them (4 ranks = 2 nodes x 2), with and without redundant replicas:
logits within float tolerance and identical greedy continuations. Plus the model's bad-input errors,
and the FP8 kernel expert path (Triton's interpreter on CPU, compiled on a GPU) against the kernels'
reference."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

# Before moeplace.kernels is first imported (its kernels pick interpreter or compiler when decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeplace.kernels._triton import HAS_TRITON  # noqa: E402
from moeplace.placement import Placement, save_placement, trivial_placement  # noqa: E402
from moeplace.readers import load_trace  # noqa: E402
from moeplace.runtime.batch import greedy_continue, pad_right  # noqa: E402
from moeplace.runtime.checkpoint import expert_tensor  # noqa: E402
from moeplace.runtime.experts import ExpertPath  # noqa: E402
from moeplace.runtime.model import EPModel  # noqa: E402
from moeplace.runtime.moe_output import PhaseTimer  # noqa: E402
from moeplace.runtime.reference import load_reference, reference_logits  # noqa: E402
from moeplace.resources import EXAMPLE_TRACE  # noqa: E402
from moeplace.runtime.synthetic_weights import random_tensors  # noqa: E402
from moeplace.runtime.tiny import tiny_config  # noqa: E402
from moeplace.runtime.tokenizer import ByteTokenizer  # noqa: E402
from moeplace.topology import Topology  # noqa: E402
from ranks_launch import LAYERS, launch, replicated  # noqa: E402
from moeplace.trace import Trace  # noqa: E402

CPU = torch.device("cpu")
TOK = ByteTokenizer()
PROMPTS = [TOK.encode(t) for t in ("Experts on many GPUs, one step at a time.", "Hello!", "")]  # "" = BOS only
STEPS = 3
WORKER = Path(__file__).with_name("ep_worker.py")


def solved(gpus: int, per_node: int, slots: int) -> Placement:
    from moeplace.placer.solve import Method, SolveOptions, solve  # ortools: only where this runs

    olmoe = load_trace(EXAMPLE_TRACE)
    trace = Trace(olmoe.counts_WLE, LAYERS, top_k=8, num_model_layers=4, n_group=8, topk_group=4)
    return solve([trace], Topology(gpus, per_node, slots), SolveOptions(method=Method.greedy, workers=1)).placement


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Reference logits of each prompt alone (unpadded), its greedy continuation, and routed counts."""
    model = load_reference(tiny_dir)
    counts = {int(l): torch.zeros(64, dtype=torch.int64) for l in LAYERS}

    def count(layer):
        def hook(module, args, out) -> None:  # out = (router logits, top-k weights, top-k ids)
            counts[layer].add_(torch.bincount(out[2].reshape(-1), minlength=64))
        return hook

    hooks = [model.model.layers[l].mlp.gate.register_forward_hook(count(l)) for l in counts]
    logits = [reference_logits(model, torch.tensor([p]))[0] for p in PROMPTS]
    for h in hooks:
        h.remove()
    continuations = []
    for p in PROMPTS:
        seq = list(p)
        for _ in range(STEPS):
            seq.append(int(reference_logits(model, torch.tensor([seq]))[0, -1].argmax()))
        continuations.append(seq[len(p):])
    return {"logits": logits, "greedy": continuations, "counts_LE": torch.stack(list(counts.values()))}


def check_against_reference(logits_BTV, greedy, reference) -> None:
    for b, prompt in enumerate(PROMPTS):
        expected = reference["logits"][b]
        torch.testing.assert_close(logits_BTV[b, : len(prompt)], expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(logits_BTV[b, : len(prompt)].argmax(-1), expected.argmax(-1))
    assert greedy == reference["greedy"]


@pytest.mark.parametrize("placement", [None, replicated(1, 1, 80, seed=3, split=True)], ids=["trivial", "replicas"])
def test_one_process_matches_reference(tiny_dir, reference, placement):
    model = EPModel.load(tiny_dir, placement, group=None, device=CPU)
    logits = model.forward(*pad_right(PROMPTS, TOK.pad_id))
    assert logits.dtype == torch.float32 and logits.shape == (3, len(PROMPTS[0]), 259)
    for m in model.moe_layers:
        m.fold_window()
    counts_LE = torch.stack([m.window_counts_E for m in model.moe_layers])
    assert torch.equal(counts_LE, reference["counts_LE"])  # padding is not routed
    stats = model.collect_stats()
    assert (stats.counts_LE == counts_LE.numpy()).all()
    assert stats.gpu_load_LG.tolist() == [[int(c.sum())] for c in counts_LE]
    assert not any(m.window_counts_E.any() or m.window_slots_GS.any() for m in model.moe_layers)  # the next window
    check_against_reference(logits, greedy_continue(model, PROMPTS, STEPS, TOK.pad_id), reference)


@pytest.fixture(scope="module")
def multi_rank(tiny_dir, tiny_variant, tmp_path_factory):
    """Every multi-rank scenario in one launch of 4 ranks: {scenario: [result of each rank]}."""
    out = tmp_path_factory.mktemp("ep")
    placements = {
        "w4-trivial": trivial_placement(64, Topology(4, 2, 16), LAYERS, 4),
        "w4-replicas": replicated(4, 2, 20, seed=1),
        "w4-split": replicated(4, 2, 20, seed=2, split=True),
        "w4-solved": solved(4, 2, 20),
        "w4-wrong-gpus": trivial_placement(64, Topology(2, 1, 32), LAYERS, 4),
        "w2-replicas-2nodes": replicated(2, 1, 40, seed=4),
    }
    scenarios = []
    for name, placement in placements.items():
        save_placement(placement, out / f"{name}.json")
        scenarios.append({"name": name, "world": int(name[1]), "placement": str(out / f"{name}.json")})
    scenarios.append({"name": "w2-default", "world": 2, "placement": None, "gpus_per_node": 1})
    # Expert 40 of layer 2 lives on rank 1 under the trivial 2-rank placement: only rank 1 reads it.
    missing = tiny_variant(lambda t: t.pop(expert_tensor(2, 40, "down_proj")), "missing-expert")
    scenarios.append({"name": "w2-missing-expert", "world": 2, "placement": None, "model_dir": str(missing)})
    return run_ranks(4, "cpu", tiny_dir, scenarios, out)


def run_ranks(world: int, device: str, model_dir: Path, scenarios: list[dict], out: Path) -> dict:
    """Write the job, run its ranks, read back {scenario: [result of each rank]}."""
    job = {"device": device, "model_dir": str(model_dir), "scenarios": scenarios}
    (out / "job.json").write_text(json.dumps(job))
    torch.save({"prompts": PROMPTS, "steps": STEPS, "pad": TOK.pad_id}, out / "inputs.pt")
    launch(world, out, WORKER)
    return {s["name"]: [torch.load(out / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(s["world"])]
            for s in scenarios}


def check_ranks(results: list[dict], reference) -> None:
    check_against_reference(results[0]["logits"], results[0]["greedy"], reference)
    assert all(r["greedy"] == results[0]["greedy"] for r in results)
    # Each rank routed its own share of the tokens: together, exactly the reference's routing.
    assert torch.equal(sum(r["routed_counts_LE"] for r in results), reference["counts_LE"])
    per_rank_load_LG = torch.stack([r["slot_tokens_LS"].sum(dim=1) for r in results], dim=1)
    for r in results:  # the step's totals, the same on every rank
        assert torch.equal(r["step_counts_LE"], reference["counts_LE"])
        assert torch.equal(r["gpu_load_LG"], per_rank_load_LG)
    assert (per_rank_load_LG.sum(dim=1) == reference["counts_LE"].sum(dim=1)).all()
    # Dispatch: a token crosses to a rank once however many of its experts live there; results come
    # back one per (token, expert).
    for layer in range(len(LAYERS)):
        traffic = [r["traffic_L"][layer] for r in results]
        for g, t in enumerate(traffic):
            assert [u[g] for u in (o.send_rows for o in traffic)] == t.recv_rows
            assert [a[g] for a in (o.send_assignments for o in traffic)] == t.recv_assignments
            assert all(rows <= n for rows, n in zip(t.send_rows, t.send_assignments))
        assert sum(sum(t.send_assignments) for t in traffic) == int(reference["counts_LE"][layer].sum())
        assert sum(sum(t.send_rows) for t in traffic) < sum(sum(t.send_assignments) for t in traffic)


@pytest.mark.parametrize("name", ["w4-trivial", "w4-replicas", "w4-split", "w4-solved", "w2-replicas-2nodes", "w2-default"])
def test_ranks_match_reference(multi_rank, reference, name):
    check_ranks(multi_rank[name], reference)


def test_bad_placement_or_checkpoint_fails_on_every_rank(multi_rank):
    errors = [r["error"] for r in multi_rank["w4-wrong-gpus"]]
    assert all("placement is for 2 GPUs, but 4 rank(s) serve" in e for e in errors)
    rank0, rank1 = (r["error"] for r in multi_rank["w2-missing-expert"])
    assert "another rank failed to load the model" in rank0
    assert f"tensor '{expert_tensor(2, 40, 'down_proj')}' is missing" in rank1


@pytest.mark.parametrize(
    "placement, message",
    [
        (trivial_placement(32, Topology(1, 1, 32), LAYERS, 4), "placement has 32 experts, "),
        (trivial_placement(64, Topology(1, 1, 64), np.array([0, 1, 2]), 4), r"placement layers 0..2 \(3\) are not the MoE layers 1..3 \(3\)"),
        (trivial_placement(64, Topology(1, 1, 64), LAYERS, 61), "placement is for a 61-layer model"),
        (trivial_placement(64, Topology(2, 1, 32), LAYERS, 4), r"placement is for 2 GPUs, but 1 rank\(s\) serve"),
    ],
)
def test_placement_must_fit_model_and_ranks(tiny_dir, placement, message):
    with pytest.raises(ValueError, match=message):
        EPModel.load(tiny_dir, placement, group=None, device=CPU)


def test_bad_inputs(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=CPU)
    ids, mask = pad_right([[1, 2, 3], [4]], TOK.pad_id)
    with pytest.raises(ValueError, match="right padding"):
        model.forward(ids, mask.flip(1))
    with pytest.raises(ValueError, match=r"ids outside \[0, 259\)"):
        model.forward(ids + 300, mask)
    with pytest.raises(ValueError, match="must be int64"):
        model.forward(ids.int(), mask)
    with pytest.raises(ValueError, match="at least one token"):
        pad_right([[1], []], TOK.pad_id)


def test_partial_fp8_blocks_match_reference(tmp_path):
    """Hidden 192 and expert intermediate 160: every FP8 weight has partial 128-blocks (gate and up 2 each)."""
    config = dataclasses.replace(tiny_config(), hidden_size=192, intermediate_size=320, moe_intermediate_size=160,
                                 n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=72)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(random_tensors(config, seed=3), tmp_path / "model.safetensors")
    phy2log = np.tile(np.concatenate([np.arange(16), [0, 0, 5, 9]]), (3, 1))
    placement = Placement(phy2log, 16, Topology(1, 1, 20), LAYERS, 4)
    ids_BT, mask_BT = pad_right(PROMPTS, TOK.pad_id)
    logits = EPModel.load(tmp_path, placement, group=None, device=CPU).forward(ids_BT, mask_BT)
    reference = load_reference(tmp_path)
    for b, prompt in enumerate(PROMPTS):
        expected = reference_logits(reference, torch.tensor([prompt]))[0]
        torch.testing.assert_close(logits[b, : len(prompt)], expected, rtol=1e-4, atol=1e-4)


def routed_inputs(T: int, D: int, gen: torch.Generator, device):
    """x_TD float32, ids_TK 8 distinct experts of 64 per token, weights_TK; fresh random values."""
    x = torch.randn(T, D, generator=gen)
    ids = torch.rand(T, 64, generator=gen).argsort(dim=1)[:, :8].contiguous()
    w = torch.rand(T, 8, generator=gen) + 0.1
    return x.to(device), ids.to(device), (2.5 * w / w.sum(dim=1, keepdim=True)).to(device)


def expert_weights_by_logical(moe) -> list[torch.Tensor]:
    """[E, ...] slot tensors of logical experts 0..E-1 (one process holds every slot; replicas are equal)."""
    first_slot = {e: s for s, e in reversed(list(enumerate(moe.slot_experts_S.tolist())))}
    index = torch.tensor([first_slot[e] for e in range(len(first_slot))], device=moe.w13_SFD.device)
    return [t[index] for t in (moe.w13_SFD, moe.w13_sinv_Sfd, moe.w2_SDF, moe.w2_sinv_Sdf)]


# the CPU path runs Triton's interpreter, which this module selects only where CUDA is absent (above): on a
# GPU machine Triton compiles for the GPU and cannot take CPU tensors (seen on the H200, 2026-12-01)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                        reason="CPU path: Triton's interpreter, machines without CUDA")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA GPU")])]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install -e '.[dev,kernels]')")
@pytest.mark.parametrize("device", DEVICES)
def test_fp8_expert_path_matches_kernel_reference(tiny_dir, device):
    """step_with_ids on the FP8 kernel path equals fused_moe_ref (float64 with the kernels' two FP8
    activation roundings) on the same weights, and the dequantise-and-matmul path within FP8 rounding."""
    from moeplace.kernels.fused_moe import fused_moe_ref

    model = EPModel.load(tiny_dir, replicated(1, 1, 80, seed=3, split=True), group=None,
                         device=torch.device(device), dtype=torch.float32)
    moe = model.moe_layers[1]
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x, ids, w = routed_inputs(37, 256, gen, device)
    moe.expert_path = ExpertPath.fp8
    timer = PhaseTimer(torch.device(device))
    timer.start()
    y, traffic = moe.step_with_ids(x, ids, w, timer)
    y = y.double().cpu()
    assert set(timer.read()) == {"route", "dispatch", "dispatch_a2a", "experts", "combine_a2a", "combine"}
    expected = fused_moe_ref(x, ids, w, *expert_weights_by_logical(moe)).cpu()
    # GPU: FP8 tensor cores sum a 128-block with ~14 fraction bits, and a SiLU·up value that lands
    # near an e4m3 rounding boundary may round the other way (tests/kernels allow 1e-2 end to end).
    assert ((y - expected).norm() / expected.norm()).item() < (1e-2 if device == "cuda" else 1e-4)
    assert traffic.send_rows == [37] and traffic.send_assignments == [37 * 8]
    moe.expert_path = ExpertPath.reference
    exact = moe.step_with_ids(x, ids, w)[0].double().cpu()
    assert ((y - exact).norm() / exact.norm()).item() < 0.1, "beyond two FP8 activation roundings"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference(tiny_dir, reference, tmp_path):
    """The dequantise-and-matmul path on one GPU in process, and on 2 GPUs (NCCL, 2 nodes x 1) as ranks
    when there are two: the reference's logits. The FP8 kernel path: 2 ranks give the 1-GPU answer."""
    cuda = torch.device("cuda")
    model = EPModel.load(tiny_dir, replicated(1, 1, 80, seed=3), group=None, device=cuda, dtype=torch.float32)
    assert all(m.expert_path is ExpertPath.fp8 for m in model.moe_layers)  # the default on CUDA
    fp8_logits = model.forward(*pad_right(PROMPTS, TOK.pad_id)).cpu()
    fp8_greedy = greedy_continue(model, PROMPTS, STEPS, TOK.pad_id)
    for moe in model.moe_layers:
        moe.expert_path = ExpertPath.reference
    logits = model.forward(*pad_right(PROMPTS, TOK.pad_id)).cpu()
    check_against_reference(logits, greedy_continue(model, PROMPTS, STEPS, TOK.pad_id), reference)
    real = [fp8_logits[b, : len(p)] - logits[b, : len(p)] for b, p in enumerate(PROMPTS)]
    # Two FP8 activation roundings per MoE layer: 6.8% of the logits' norm on CPU (Triton's interpreter).
    assert torch.cat(real).norm() / torch.cat([logits[b, : len(p)] for b, p in enumerate(PROMPTS)]).norm() < 0.15
    if torch.cuda.device_count() < 2:
        return
    save_placement(replicated(2, 1, 40, seed=4), tmp_path / "p.json")
    scenarios = [{"name": "nccl", "world": 2, "placement": str(tmp_path / "p.json"), "expert_path": "reference"},
                 {"name": "nccl-fp8", "world": 2, "placement": str(tmp_path / "p.json"), "expert_path": "fp8"}]
    results = run_ranks(2, "cuda", tiny_dir, scenarios, tmp_path)
    check_ranks(results["nccl"], reference)
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(results["nccl-fp8"][0]["logits"][b, : len(prompt)], fp8_logits[b, : len(prompt)],
                                   rtol=2e-2, atol=2e-2)
    assert all(r["greedy"] == fp8_greedy for r in results["nccl-fp8"])
