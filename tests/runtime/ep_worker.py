"""Ranks of the multi-process EP tests. `python ep_worker.py JOB_DIR` is one rank, launched as torchrun
launches it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment); `--ranks N` forks the N
ranks from one process, which imports torch and transformers once instead of N times (15 s of a
2-core machine's time saved) and has run no OpenMP work before forking.

JOB_DIR/job.json gives the device ("cpu": gloo, float32; "cuda": NCCL, one GPU a rank, float32) and
lists scenarios {name, world, model_dir, placement (file or null), gpus_per_node, expert_path};
JOB_DIR/inputs.pt holds the prompts. Worlds of 2 run on ranks 0-1 in a subgroup. Each rank writes
JOB_DIR/{name}.rank{r}.pt: the logits (rank 0), greedy continuations, per-layer routed counts and
slot loads and dispatch traffic of the first forward (collected over the ranks), or the load error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moeplace.placement import load_placement
from moeplace.runtime.batch import greedy_continue, pad_right
from moeplace.runtime.experts import ExpertPath
from moeplace.runtime.model import EPModel


def run_scenario(job: dict, scenario: dict, groups: dict, rank: int, device: torch.device, out: Path) -> None:
    world = scenario["world"]
    if rank >= world:
        return
    inputs = torch.load(out / "inputs.pt")
    placement = load_placement(scenario["placement"]) if scenario["placement"] else None
    try:
        model = EPModel.load(Path(scenario.get("model_dir") or job["model_dir"]), placement, group=groups[world],
                             device=device, gpus_per_node=scenario.get("gpus_per_node"), dtype=torch.float32)
    except ValueError as exc:
        torch.save({"error": str(exc)}, out / f"{scenario['name']}.rank{rank}.pt")
        return
    for moe in model.moe_layers:
        moe.expert_path = ExpertPath(scenario.get("expert_path") or moe.expert_path)
    forward = model.recompute(*pad_right(inputs["prompts"], inputs["pad"]))
    logits = forward.logits
    for m in model.moe_layers:
        m.fold_window()
    own_counts_LE = torch.stack([m.window_counts_E.cpu() for m in model.moe_layers])  # before the collect
    stats = model.collect_stats()
    result = {
        "routed_counts_LE": own_counts_LE,
        "slot_tokens_LS": torch.stack([m.slot_tokens_S.cpu() for m in model.moe_layers]),
        "step_counts_LE": torch.from_numpy(stats.counts_LE),
        "gpu_load_LG": torch.from_numpy(stats.gpu_load_LG),
        "traffic_L": forward.traffic_L,
        "greedy": greedy_continue(model, inputs["prompts"], inputs["steps"], inputs["pad"]),
        "logits": logits.cpu() if rank == 0 else None,
    }
    torch.save(result, out / f"{scenario['name']}.rank{rank}.pt")


def main(out: Path) -> None:
    job = json.loads((out / "job.json").read_text())
    rank = int(os.environ["RANK"])
    device = torch.device("cpu")
    if job.get("device") == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    groups = {dist.get_world_size(): dist.group.WORLD, 2: dist.new_group([0, 1])}  # every rank calls new_group
    for scenario in job["scenarios"]:
        run_scenario(job, scenario, groups, rank, device, out)
    dist.destroy_process_group()


def fork_ranks(world: int, out: Path, main=main) -> int:
    """Run main(out) as ranks 0..world-1 in forked children; the exit status is 1 when any rank failed."""
    import traceback

    from transformers import DeepseekV3ForCausalLM  # noqa: F401 - imported once, before forking

    children = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            code = 0
            try:
                main(out)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children.append(pid)
    return int(any(os.waitpid(pid, 0)[1] != 0 for pid in children))


if __name__ == "__main__":
    if sys.argv[2:3] == ["--ranks"]:
        sys.exit(fork_ranks(int(sys.argv[3]), Path(sys.argv[1])))
    main(Path(sys.argv[1]))
