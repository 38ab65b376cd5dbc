"""The runtime's recorder: counts accumulate on the device between collects, windows keep times and
token counts, sampled top-k ids line up across layers, and the engine collects on every rank together."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from moeplace.runtime.batch import pad_right
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.sampling import SamplingParams
from moeplace.runtime.model import EPModel
from moeplace.runtime.recorder import Recorder
from moeplace.runtime.reference import load_reference, reference_logits
from moeplace.runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BATCHES = [["expert routing", "hot GPU"], ["the token goes to the node", "x"], ["balance the load of every layer"]]


def test_windows_merge_collects_by_start_time():
    rec = Recorder([1, 2], num_experts=4, top_k=2, num_model_layers=3)
    with pytest.raises(ValueError, match="nothing recorded"):
        rec.trace({})
    rec.add(100.0, 2, np.ones((2, 4)))  # not recording: ignored
    rec.start(window_seconds=1.0, sample_rate=0.5)
    rng = np.random.default_rng(0)
    for start in (100.0, 100.4, 100.9, 101.2, 103.0):  # collects: the first three make one window
        rec.add(start, 3, np.full((2, 4), 1.0), rng.integers(0, 4, (3, 2, 2)))
    trace = rec.trace({"engine": "test"})
    assert trace.time_W.tolist() == [100.0, 101.2, 103.0]
    assert trace.tokens_W.tolist() == [9, 3, 3]
    assert trace.counts_WLE[:, 0, 0].tolist() == [3, 1, 1]
    assert trace.topk_ids_TLK.shape == (15, 2, 2)
    rec.max_samples = 4
    rec.start(window_seconds=10, sample_rate=1.0)
    for i in range(5):
        rec.add(200.0 + i, 1, np.ones((2, 4)), np.zeros((3, 2, 2), dtype=np.int64))
    assert rec.trace({}).topk_ids_TLK.shape[0] == 4  # bounded
    with pytest.raises(ValueError, match="sample_rate"):
        rec.start(sample_rate=2)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))


def reference_counts(reference, layers: list[int], prompts: list[list[int]], num_experts: int) -> np.ndarray:
    """[L, E] top-k selections of transformers' own router in the single-process reference, prompt by prompt."""
    counts = np.zeros((len(layers), num_experts), dtype=np.int64)

    def count(row):
        def hook(module, args, out) -> None:  # out = (router logits, top-k weights, top-k ids)
            counts[row] += np.bincount(out[2].reshape(-1).numpy(), minlength=num_experts)
        return hook

    hooks = [reference.model.layers[l].mlp.gate.register_forward_hook(count(row)) for row, l in enumerate(layers)]
    try:
        for p in prompts:
            reference_logits(reference, torch.tensor([p]))
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_counts_accumulate_on_the_device_until_collected(model, tiny_dir):
    reference = load_reference(tiny_dir)
    model.collect_stats()  # start clean
    model.sample_rate = 1.0
    expected_LE = np.zeros((len(model.moe_layers), model.config.n_routed_experts), dtype=np.int64)
    tokens = 0
    try:
        for prompts in BATCHES:
            encoded = [TOK.encode(p) for p in prompts]
            model.forward(*pad_right(encoded, TOK.pad_id))
            expected_LE += reference_counts(reference, model.config.moe_layers, encoded, expected_LE.shape[1])
            tokens += sum(map(len, encoded))
        stats = model.collect_stats()
    finally:
        model.sample_rate = 0.0
    assert np.array_equal(stats.counts_LE, expected_LE)  # three steps, exactly
    assert stats.gpu_load_LG[:, 0].tolist() == expected_LE.sum(axis=1).tolist()
    # every token sampled (rate 1): its ids, layer by layer, are the ones counted
    assert stats.samples_TLK.shape == (tokens, len(model.moe_layers), model.config.num_experts_per_tok)
    for row in range(len(model.moe_layers)):
        assert np.array_equal(np.bincount(stats.samples_TLK[:, row].ravel(), minlength=expected_LE.shape[1]),
                              expected_LE[row])
    again = model.collect_stats()  # a new window: nothing since
    assert again.counts_LE.sum() == 0 and again.samples_TLK is None


def test_engine_collects_windows_and_runs_flush_callbacks_in_its_thread(model):
    engine = Engine(model, EngineConfig(max_batch=4), None, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    ran_outside = []
    engine.flush_stats(lambda: ran_outside.append(threading.current_thread().name))  # no loop yet: at once
    assert ran_outside == [threading.current_thread().name]
    windows, steps_tokens = [], []
    engine.on_stats = windows.append
    engine.on_step = lambda s: steps_tokens.append(s.tokens)
    engine.stats_interval = 3600.0  # only flushes collect
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    try:
        requests = [engine.submit(TOK.encode(p), SamplingParams(max_tokens=3)) for p in BATCHES[0] + BATCHES[1]]
        for request in requests:
            request.result(timeout=60)
        where = []
        engine.flush_stats(lambda: where.append(threading.current_thread().name))
        assert where == ["engine"]  # between two steps, in the engine's thread
        with pytest.raises(RuntimeError, match="boom"):  # what the callback raised reaches the caller ...
            engine.flush_stats(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        assert engine.alive()  # ... and the engine keeps serving
    finally:
        engine.stop()
        loop.join(timeout=60)
    collected = [w for w in windows if w.steps]
    assert sum(w.steps for w in windows) == len(steps_tokens) == engine.steps
    assert sum(w.tokens for w in windows) == sum(steps_tokens)
    k = model.config.num_experts_per_tok
    # top-k: every routed token counted k times in every MoE layer of its window
    for w in collected:
        assert (w.stats.counts_LE.sum(axis=1) == w.tokens * k).all()
    assert all(a.end <= b.start + 1e-9 for a, b in zip(windows, windows[1:]))
