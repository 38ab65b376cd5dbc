"""The engine on 2 and 4 real gloo ranks (data-parallel attention, KV cache, EP MoE): every answer is
the 1-process recompute path's greedy answer, submitted alone (the other ranks step empty batches) or
all at once (mixed lengths, spread over the ranks), with and without replicas, and with decode steps
padded to a batch bucket shared by the ranks (the fixed-capacity MoE path), also through the decode-step
graphs' static tensors (replayed eagerly on CPU); a seeded sampled request gives the same tokens on
whichever rank serves it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from moeplace.placement import save_placement, trivial_placement
from moeplace.runtime.batch import greedy_continue
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.model import EPModel
from moeplace.topology import Topology
from moeplace.runtime.sampling import SamplingParams
from ranks_launch import LAYERS, launch, replicated

PROMPTS = [list(b"\x01Experts on many GPUs."), list(b"\x01Hi"), list(b"\x01route the hot layer now"), list(b"\x01x")]
MAX_TOKENS = 4
SEEDED = {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 7}
WORKER = Path(__file__).with_name("engine_worker.py")


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-ranks")
    placements = {"w4-trivial": trivial_placement(64, Topology(4, 2, 16), LAYERS, 4),
                  "w4-replicas": replicated(4, 2, 20, seed=1), "w2-replicas": replicated(2, 1, 40, seed=4),
                  "w2-buckets": replicated(2, 1, 40, seed=4), "w2-graphs": replicated(2, 1, 40, seed=4)}
    scenarios = []
    for name, placement in placements.items():
        save_placement(placement, out / f"{name}.json")
        engine = {"max_batch": 2, "block_size": 8, "decode_bucket": 2 if name in ("w2-buckets", "w2-graphs") else 0,
                  "decode_graphs": name == "w2-graphs"}
        scenarios.append({"name": name, "world": int(name[1]), "placement": str(out / f"{name}.json"),
                          "engine": engine})
    job = {"model_dir": str(tiny_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "seeded": SEEDED,
           "scenarios": scenarios}
    (out / "job.json").write_text(json.dumps(job))
    launch(4, out, WORKER)
    return {s["name"]: json.loads((out / f"{s['name']}.json").read_text()) for s in scenarios}


@pytest.fixture(scope="module")
def one_process(tiny_dir):
    """Greedy answers of the recompute path, and the seeded request served by a 1-rank engine."""
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))
    engine = Engine(model, EngineConfig(max_batch=2), None, eos_id=-1)
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    try:
        seeded = list(engine.submit(PROMPTS[0], SamplingParams(**SEEDED)).result(timeout=120).token_ids)
    finally:
        engine.stop()
        loop.join(timeout=60)
    return {"greedy": greedy_continue(model, PROMPTS, MAX_TOKENS, pad_id=0), "seeded": seeded}


@pytest.mark.parametrize("name", ["w4-trivial", "w4-replicas", "w2-replicas", "w2-buckets", "w2-graphs"])
def test_answers_do_not_depend_on_ranks_or_batching(served, one_process, name):
    result = served[name]
    assert result["alone"] == one_process["greedy"]
    assert result["together"] == one_process["greedy"]
    assert result["seeded"] == [one_process["seeded"]] * 2
    world = int(name[1])
    together = result["served_by"][len(PROMPTS): 2 * len(PROMPTS)]
    assert sorted(together) == sorted(r % world for r in range(len(PROMPTS)))  # least loaded first: spread
    assert len(set(result["served_by"][-2:])) == 2  # the seeded twins ran on two ranks
    assert max(result["peak"]) <= 2  # max_batch per rank
