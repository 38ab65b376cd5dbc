"""EPModel against the single-process reference: 1 rank in process, 2 and 4 gloo ranks as subprocesses
launched the way torchrun launches them (4 ranks = 2 nodes x 2), with and without redundant replicas:
logits within float tolerance and identical greedy continuations. Plus the model's bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moeplace.placement import Placement, save_placement, trivial_placement
from moeplace.readers import load_trace
from moeplace.runtime.batch import greedy_continue, pad_right
from moeplace.runtime.checkpoint import expert_tensor
from moeplace.runtime.model import EPModel
from moeplace.runtime.reference import load_reference, reference_logits
from moeplace.runtime.tiny import EXAMPLE_TRACE, _random_tensors, tiny_config
from moeplace.runtime.tokenizer import ByteTokenizer
from moeplace.topology import Topology
from moeplace.trace import Trace

CPU = torch.device("cpu")
TOK = ByteTokenizer()
PROMPTS = [TOK.encode(t) for t in ("Experts on many GPUs, one step at a time.", "Hello!", "")]  # "" = BOS only
STEPS = 3
LAYERS = np.array([1, 2, 3])
WORKER = Path(__file__).with_name("ep_worker.py")


def replicated(gpus: int, per_node: int, slots: int, seed: int, split: bool = False) -> Placement:
    """Every expert once plus random extra replicas (some on the same GPU as their twin)."""
    rng = np.random.default_rng(seed)
    rows, splits = [], []
    for _ in LAYERS:
        row = rng.permutation(np.concatenate([np.arange(64), rng.choice(64, gpus * slots - 64)]))
        raw = rng.uniform(0.2, 1.0, len(row))
        rows.append(row)
        splits.append(raw / np.bincount(row, weights=raw, minlength=64)[row])
    return Placement(np.stack(rows), 64, Topology(gpus, per_node, slots), LAYERS, 4,
                     split_LP=np.stack(splits) if split else None)


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
    counts_LE = torch.stack([m.routed_counts_E for m in model.moe_layers])
    assert torch.equal(counts_LE, reference["counts_LE"])  # padding is not routed
    assert torch.equal(model.routed_counts_LE, counts_LE)
    assert {l: v.tolist() for l, v in model.last_gpu_loads().items()} == {l: [int(c.sum())] for l, c in zip(LAYERS, counts_LE)}
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
    launch(world, out)
    return {s["name"]: [torch.load(out / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(s["world"])]
            for s in scenarios}


def launch(world: int, job_dir: Path) -> None:
    """Start `world` gloo ranks on 127.0.0.1 (torchrun's environment contract) and wait for all of them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), str(job_dir), "--ranks", str(world)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert done.returncode == 0, f"ranks failed:\n{done.stdout[-5000:]}"


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
        (trivial_placement(32, Topology(1, 1, 32), LAYERS, 4), "placement has 32 experts, model"),
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
    save_file(_random_tensors(config, seed=3), tmp_path / "model.safetensors")
    phy2log = np.tile(np.concatenate([np.arange(16), [0, 0, 5, 9]]), (3, 1))
    placement = Placement(phy2log, 16, Topology(1, 1, 20), LAYERS, 4)
    ids_BT, mask_BT = pad_right(PROMPTS, TOK.pad_id)
    logits = EPModel.load(tmp_path, placement, group=None, device=CPU).forward(ids_BT, mask_BT)
    reference = load_reference(tmp_path)
    for b, prompt in enumerate(PROMPTS):
        expected = reference_logits(reference, torch.tensor([prompt]))[0]
        torch.testing.assert_close(logits[b, : len(prompt)], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference(tiny_dir, reference, tmp_path):
    """One GPU in process; 2 GPUs (NCCL, 2 nodes x 1) as ranks, when there are two."""
    model = EPModel.load(tiny_dir, replicated(1, 1, 80, seed=3), group=None, device=torch.device("cuda"),
                         dtype=torch.float32)
    logits = model.forward(*pad_right(PROMPTS, TOK.pad_id)).cpu()
    check_against_reference(logits, greedy_continue(model, PROMPTS, STEPS, TOK.pad_id), reference)
    if torch.cuda.device_count() < 2:
        return
    save_placement(replicated(2, 1, 40, seed=4), tmp_path / "p.json")
    scenarios = [{"name": "nccl", "world": 2, "placement": str(tmp_path / "p.json")}]
    check_ranks(run_ranks(2, "cuda", tiny_dir, scenarios, tmp_path)["nccl"], reference)
