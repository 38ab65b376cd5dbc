"""CUDA graphs of the whole decode step (runtime/step_graphs.py) on one GPU: the engine's answers with the
graphs replayed equal its answers with the same padded steps run eagerly (same kernels, same order).
On CPU the graphs' static-tensor path runs eagerly in tests/runtime/test_engine_ranks.py."""

from __future__ import annotations

import threading

import pytest
import torch

from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.model import EPModel
from moeplace.runtime.sampling import SamplingParams

PROMPTS = [list(b"\x01Experts on many GPUs."), list(b"\x01Hi"), list(b"\x01route the hot layer now")]


def answers(model, config: EngineConfig) -> list[list[int]]:
    engine = Engine(model, config, None, eos_id=-1)
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
        return [list(h.result(timeout=300).token_ids) for h in handles]
    finally:
        engine.stop()
        loop.join(timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_decode_steps_equal_eager(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cuda"), dtype=torch.float32)
    eager = answers(model, EngineConfig(max_batch=4, decode_bucket=4))
    graphed = answers(model, EngineConfig(max_batch=4, decode_bucket=4, decode_graphs=True))
    assert graphed == eager
