"""Ranks of the multi-rank engine tests: rank 0 runs an `Engine` (no HTTP) and submits the job's
requests, the other ranks run `worker_loop`, exactly as `moeplace serve` runs them.

`python engine_worker.py JOB_DIR --ranks N` forks N gloo ranks (ep_worker.fork_ranks). JOB_DIR/job.json:
model_dir, prompts (token id lists), max_tokens, seeded (SamplingParams fields), and scenarios {name, world, placement (file or null),
engine (EngineConfig fields)}; worlds smaller than N run on ranks 0..world-1. Rank 0 writes
JOB_DIR/{name}.json: "alone" (each prompt submitted after the previous answered: the other ranks idle),
"together" (all at once), "seeded" (one sampled request submitted twice at once), "served_by" (rank
of each sequence, in submission order) and "peak" (most sequences a rank held at once).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ep_worker import fork_ranks
from moeplace.placement import load_placement
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.model import EPModel
from moeplace.runtime.ranks import worker_loop
from moeplace.runtime.sampling import SamplingParams

def serve_scenario(job: dict, scenario: dict, groups: dict, rank: int, out: Path) -> None:
    world = scenario["world"]
    if rank >= world:
        return
    group, control = groups[world]
    placement = load_placement(scenario["placement"]) if scenario["placement"] else None
    model = EPModel.load(Path(job["model_dir"]), placement, group=group, device=torch.device("cpu"))
    config = EngineConfig(**scenario["engine"])
    if rank > 0:
        return worker_loop(model, control, config)
    engine = Engine(model, config, control, eos_id=-1)  # no end-of-sequence: every answer is max_tokens long
    peak, served_by = [0] * world, {}
    engine.on_admit = lambda admit: served_by.__setitem__(admit.seq_id, admit.rank)
    engine.on_step = lambda _: peak.__setitem__(slice(None), [max(p, load.sequences) for p, load in
                                                              zip(peak, engine.loads)])
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    try:
        greedy = SamplingParams(max_tokens=job["max_tokens"])
        alone = [list(engine.submit(p, greedy).result(timeout=120).token_ids) for p in job["prompts"]]
        handles = [engine.submit(p, greedy) for p in job["prompts"]]
        together = [list(h.result(timeout=120).token_ids) for h in handles]
        seeded = [engine.submit(job["prompts"][0], SamplingParams(**job["seeded"])) for _ in range(2)]
        seeded = [list(h.result(timeout=120).token_ids) for h in seeded]
    finally:
        engine.stop()
        loop.join(timeout=120)
    result = {"alone": alone, "together": together, "seeded": seeded, "peak": peak,
              "served_by": [served_by[i] for i in sorted(served_by)]}
    (out / f"{scenario['name']}.json").write_text(json.dumps(result))


def main(out: Path) -> None:
    job = json.loads((out / "job.json").read_text())
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    # every rank calls new_group for every group, members or not
    groups = {dist.get_world_size(): (dist.group.WORLD, dist.new_group()),
              2: (dist.new_group([0, 1]), dist.new_group([0, 1]))}
    for scenario in job["scenarios"]:
        serve_scenario(job, scenario, groups, rank, out)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(fork_ranks(int(sys.argv[3]), Path(sys.argv[1]), main))
