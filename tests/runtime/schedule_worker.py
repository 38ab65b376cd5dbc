"""Ranks of the reshard schedule test: a live reshard of the tiny model's three MoE layers on two gloo
ranks, with a staging budget of exactly two layers and serving steps far apart (step boundaries are
where layers swap). Rank 0 writes JOB_DIR/swaps.json: the layer rows each step swapped, in step order.

`python schedule_worker.py JOB_DIR --ranks 2`. JOB_DIR/job.json: model_dir, old and new (placement
files), step_s (the time between two steps).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ep_worker import fork_ranks
from moeplace.placement import load_placement
from moeplace.runtime.control import SwapLayer
from moeplace.runtime.model import EPModel
from moeplace.runtime.reshard import Resharder
from moeplace.runtime.reshard_options import ReshardOptions
from moeplace.runtime.reshard_plan import NETWORK_LINKS, plan_reshard
from moeplace.runtime.reshard_share import overlaps


def two_layers_of_staging(old, new, expert_bytes: int) -> int:
    """The budget that holds rows 0 and 1 together, and 1 and 2, but never all three."""
    plan = plan_reshard(old, new)
    for budget in range(1, 6 * plan.topology.slots_per_gpu):  # in experts: staged and sent rows
        schedule = overlaps(plan, [0, 1, 2], expert_bytes, budget * expert_bytes, NETWORK_LINKS)
        if schedule.pair[:2] == (True, True):
            assert schedule.free[:2] == (True, False), schedule
            return budget * expert_bytes
    raise AssertionError("no budget holds two layers")


def main(out: Path) -> None:
    job = json.loads((out / "job.json").read_text())
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    old, new = load_placement(job["old"]), load_placement(job["new"])
    model = EPModel.load(Path(job["model_dir"]), old, group=dist.group.WORLD, device=torch.device("cpu"))
    expert_bytes = model.moe_layers[0].read_slot(0).nbytes
    options = ReshardOptions.from_env({}, staging_bytes=two_layers_of_staging(old, new, expert_bytes))
    resharder = Resharder(model, dist.new_group(), rank, control=dist.new_group(), options=options)
    resharder.connect()
    control = dist.new_group()  # the steps' broadcasts (the serving loop's group)
    job_id = resharder.submit(new).id if rank == 0 else None
    swaps, ended = [], False
    while not ended:
        box = [(resharder.due_actions(), resharder.jobs.get(job_id).state.final) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=control)
        actions, ended = box[0]
        for action in actions:
            resharder.apply(action)
        swaps.append([int(a.row) for a in actions if isinstance(a, SwapLayer)])
        time.sleep(job["step_s"])
    if rank == 0:
        assert resharder.jobs.get(job_id).state.value == "done", resharder.jobs.get(job_id)
        assert np.array_equal(model.moe_layers[2].phy2log_P.numpy(), new.phy2log_LP[2])
        (out / "swaps.json").write_text(json.dumps([s for s in swaps if s]))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(fork_ranks(int(sys.argv[3]), Path(sys.argv[1]), main))
