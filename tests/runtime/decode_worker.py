"""Ranks of the fixed-capacity decode tests: `python decode_worker.py JOB_DIR --ranks N` forks N ranks
(RANK, WORLD_SIZE set here; MASTER_ADDR, MASTER_PORT from the environment), gloo on CPU, NCCL on CUDA.

JOB_DIR/job.json: {"device", "scenarios": [{name, world, placement, swap_to, capacity, tokens: [per rank],
seed}]}. Each rank builds one tiny-model MoE layer (random FP8 experts, gate and bias from `seed`, the
same on every rank) and writes JOB_DIR/{name}.rank{r}.pt with, for its own batch: the variable-size path's
routed output and counts, the decode path's, the whole layer through `DecodeGraphs` and eagerly, and the
decode output after an in-place layout swap next to a layer built on the new layout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeplace.placement import load_placement
from moeplace.runtime.comm import Comm
from moeplace.runtime.graphs import DecodeGraphs
from moeplace.runtime.moe import EPMoE
from moeplace.runtime.routing import select_experts
from moeplace.runtime.tiny import tiny_config


def build(placement, comm: Comm, device: torch.device, seed: int) -> EPMoE:
    """The MoE layer of row 0 with every logical expert's weights drawn from `seed` (same on all ranks)."""
    config = tiny_config()
    moe = EPMoE(config, config.to_hf(), 1, 0, placement, comm, device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.shared_experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=gen) / 16)
        moe.gate.e_score_correction_bias.copy_(torch.randn(64, generator=gen) * 0.1)
    install_experts(moe, seed)
    return moe


def install_experts(moe: EPMoE, seed: int) -> None:
    """Slot s gets logical expert slot_experts_S[s]'s weights (as a reshard installs them, in place)."""
    gen = torch.Generator().manual_seed(seed + 1)
    names = ("w13_SFD", "w13_sinv_Sfd", "w2_SDF", "w2_sinv_Sdf")
    every = []
    for name in names:
        shape = (64, *getattr(moe, name).shape[1:])
        every.append(torch.randn(shape, generator=gen).to(torch.float8_e4m3fn) if "sinv" not in name
                     else torch.rand(shape, generator=gen) * 0.01 + 0.005)
    index = moe.slot_experts_S.cpu()
    for name, all_E in zip(names, every):
        getattr(moe, name).copy_(all_E[index])


def layer_step(moe: EPMoE, x_CD: torch.Tensor, live_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = moe.forward_decode(x_CD, live_C)
    return out.y_TD, out.ids_TK


def counters(moe: EPMoE) -> dict:
    out = {"window_slots_GS": moe.window_slots_GS.cpu().clone(), "slot_tokens_S": moe.slot_tokens_S.cpu().clone()}
    moe.window_slots_GS.zero_()
    return out


def run_scenario(scenario: dict, groups: dict, rank: int, device: torch.device, out: Path) -> None:
    world, C, seed = scenario["world"], scenario["capacity"], scenario["seed"]
    if rank >= world:
        return
    comm = Comm.of(groups[world])
    moe = build(load_placement(scenario["placement"]), comm, device, seed)
    n = scenario["tokens"][rank]
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.zeros(C, 256)
    x[:n] = torch.randn(n, 256, generator=gen)
    x = x.to(device)
    live = torch.arange(C, device=device) < n
    with torch.no_grad():
        ids, w = select_experts(F.linear(x.float(), moe.gate.weight), moe.gate.e_score_correction_bias, moe.router)
        result = {"variable": moe.step_with_ids(x[:n], ids[:n], w[:n])[0].cpu(), "variable_counts": counters(moe)}
        result["decode"] = moe.decode_step(x, ids, w, live).cpu()
        result["decode_counts"] = counters(moe)
        result["layer_variable"] = moe.forward(x[:n]).y_TD.cpu()
        counters(moe)
        graphs = DecodeGraphs(lambda x_, live_: layer_step(moe, x_, live_), [4, C], 256, torch.float32, device)
        bucket = graphs.bucket_for(max(scenario["tokens"]))
        result["layer_graph"], graph_ids = (t.cpu() for t in graphs.run(x[:n], bucket))
        result["graph_ids_ok"] = torch.equal(graph_ids, ids[:n].cpu())
        result["graph_counts"] = counters(moe)
        # the eager step on the bucket's padded batch: the shared expert's matmuls see the same rows
        x_B, live_B = x[:bucket], torch.arange(bucket, device=device) < n
        result["layer_eager"] = moe.forward_decode(x_B, live_B).y_TD[:n].cpu()
        counters(moe)
        # a reshard's swap: the new layout in place, the moved experts' weights installed in place
        new = load_placement(scenario["swap_to"])
        moe.fold_window()
        moe.use_layout(new)
        install_experts(moe, seed)
        result["swapped_graph"] = graphs.run(x[:n], bucket)[0].cpu()
        result["fresh_layer"] = build(new, comm, device, seed).forward_decode(x_B, live_B).y_TD[:n].cpu()
    torch.save(result, out / f"{scenario['name']}.rank{rank}.pt")


def run_engine_scenario(scenario: dict, groups: dict, rank: int, device: torch.device, out: Path) -> None:
    """The engine's decode step (attention with the KV cache + every layer) through the variable-size and
    the fixed-capacity MoE paths on two identical caches: the logits of each step, per path."""
    from moeplace.runtime.kv_cache import CacheShape, KVCache
    from moeplace.runtime.model import EPModel

    world = scenario["world"]
    if rank >= world:
        return
    placement = load_placement(scenario["placement"]) if scenario["placement"] else None
    model = EPModel.load(Path(scenario["model_dir"]), placement, group=groups[world], device=device)
    config, B = model.config, scenario["sequences"]
    shape = CacheShape(num_layers=config.num_hidden_layers, num_blocks=4 * B, block_size=16,
                       width=config.kv_lora_rank + config.qk_rope_head_dim)
    caches = [KVCache(shape, device, model.dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(3, 250, (3 + 4 * b + rank,), generator=gen) for b in range(B)]
    for cache in caches:
        for b, prompt in enumerate(prompts):
            cache.admit(b, len(prompt) + scenario["steps"])
        prefill = cache.plan([], [(b, len(p)) for b, p in enumerate(prompts)])
        logits = model.step(cache, prefill, torch.cat(prompts))
    token_B = logits.argmax(dim=-1)
    live_B = torch.ones(B, dtype=torch.bool, device=device)
    result = {"variable": [], "fixed": []}
    for _ in range(scenario["steps"]):
        variable = model.decode_step(caches[0], caches[0].plan(list(range(B)), []), token_B)
        fixed = model.decode_step(caches[1], caches[1].plan(list(range(B)), []), token_B, live_B)
        result["variable"].append(variable.cpu())
        result["fixed"].append(fixed.cpu())
        token_B = variable.argmax(dim=-1)
    torch.save(result, out / f"{scenario['name']}.rank{rank}.pt")


def main(out: Path) -> None:
    job = json.loads((out / "job.json").read_text())
    rank = int(os.environ["RANK"])
    device = torch.device("cpu")
    if job["device"] == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    groups = {world: dist.group.WORLD, 1: None}
    if world > 2:
        groups[2] = dist.new_group([0, 1])  # every rank calls new_group
    for scenario in job["scenarios"]:
        run = run_engine_scenario if scenario.get("kind") == "engine" else run_scenario
        run(scenario, groups, rank, device, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    from ep_worker import fork_ranks

    sys.exit(fork_ranks(int(sys.argv[3]), Path(sys.argv[1]), main))
