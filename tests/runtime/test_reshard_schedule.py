"""The layer schedule of a live reshard against step boundaries (two gloo ranks, the tiny model): with
a staging budget of two layers, a layer that has landed is checked and committed before the next
layer waits for staging room, so it swaps at the same step boundary as the layer before it. Posting
the next layer first made it wait there, unchecked, for the earlier layer's install: each pair of
layers then cost a step (measured in a loaded server, BENCHMARKS.md, live reshard, 01:17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeplace.placement import Placement, save_placement, trivial_placement
from moeplace.topology import Topology
from ranks_launch import LAYERS, launch

WORKER = Path(__file__).with_name("schedule_worker.py")


def test_landed_layers_swap_at_one_boundary(tiny_dir, tmp_path):
    old = trivial_placement(64, Topology(2, 2, 32), LAYERS, 4)
    rows = old.phy2log_LP.copy()
    rows[:, list(range(8)) + list(range(32, 40))] = rows[:, list(range(32, 40)) + list(range(8))]  # 8 each way
    for lo in (8, 40):  # and 8 experts that move within each GPU: staged, not sent
        rows[:, lo:lo + 8] = np.roll(rows[:, lo:lo + 8], 1, axis=1)
    new = Placement(rows, 64, old.topology, LAYERS, 4)
    save_placement(old, tmp_path / "old.json")
    save_placement(new, tmp_path / "new.json")
    job = {"model_dir": str(tiny_dir), "old": str(tmp_path / "old.json"), "new": str(tmp_path / "new.json"),
           "step_s": 0.4}
    (tmp_path / "job.json").write_text(json.dumps(job))
    launch(2, tmp_path, WORKER)
    swaps = json.loads((tmp_path / "swaps.json").read_text())
    assert swaps == [[0, 1], [2]], swaps
    assert np.array_equal(np.sort(np.concatenate(swaps)), np.arange(3))
