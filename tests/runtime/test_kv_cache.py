"""The latent KV cache against the recompute path, in one process: prefill + absorbed decode give the
recompute logits (float32, within 1e-4: the absorbed form regroups the same sums), greedy answers are
identical for single and batched mixed-length requests and when sequences join mid-way, and the
memory budget decides admission."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from moeplace.placement import Placement
from moeplace.runtime.batch import greedy_continue, pad_right
from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.kv_cache import CacheShape, KVCache, block_bytes
from moeplace.runtime.model import EPModel
from moeplace.runtime.reference import load_reference, reference_logits
from moeplace.runtime.sampling import SamplingParams
from moeplace.runtime.tokenizer import ByteTokenizer
from moeplace.topology import Topology

TOK = ByteTokenizer()
PROMPTS = [TOK.encode(t) for t in ("Experts on many GPUs, one step at a time.", "Hi", "route the hot layer")]
TOLERANCE = 1e-4  # float32 logits: absorbed decode vs transformers' expanded attention
CPU = torch.device("cpu")


def replicas_placement(seed: int) -> Placement:
    """One rank of 80 slots: every expert once plus 16 random extra replicas, split unevenly."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.concatenate([np.arange(64), rng.choice(64, 16)])) for _ in range(3)]
    return Placement(np.stack(rows), 64, Topology(1, 1, 80), np.array([1, 2, 3]), 4)


@pytest.fixture(scope="module", params=["trivial", "replicas"])
def model(request, tiny_dir):
    placement = None if request.param == "trivial" else replicas_placement(seed=5)
    return EPModel.load(tiny_dir, placement, group=None, device=CPU)


def new_cache(model, tokens: int = 512) -> KVCache:
    shape = CacheShape.for_budget(model.config, tokens * block_bytes(model.config, 1, torch.float32), 8,
                                  torch.float32)
    return KVCache(shape, CPU, torch.float32, context_bucket=16)


def cached_greedy(model, prompts: list[list[int]], steps: int, join_at: int = 0):
    """Greedy answers and per-step logits through the cache; prompts after the first join the batch
    `join_at` steps late (continuous batching: prefill beside decode)."""
    cache, seqs = new_cache(model), {}
    answers, logits = {i: [] for i in range(len(prompts))}, {i: [] for i in range(len(prompts))}
    for step in range(steps + join_at):
        new = [i for i in range(len(prompts)) if i not in seqs and (i == 0 or step >= join_at)]
        decode = [i for i in seqs if len(answers[i]) < steps]
        for i in new:
            cache.admit(i, len(prompts[i]) + steps)
            seqs[i] = True
        plan = cache.plan(decode, [(i, len(prompts[i])) for i in new])
        ids = [answers[i][-1] for i in decode] + [t for i in new for t in prompts[i]]
        out = model.step(cache, plan, torch.tensor(ids))
        for i, row in zip(decode + new, out):
            answers[i].append(int(row.argmax()))
            logits[i].append(row)
    return [answers[i] for i in range(len(prompts))], logits


def test_cached_logits_and_greedy_match_recompute(model):
    answers, logits = cached_greedy(model, PROMPTS, steps=4)
    assert answers == greedy_continue(model, PROMPTS, 4, TOK.pad_id)
    for i, prompt in enumerate(PROMPTS):
        ids_BT, mask_BT = pad_right([prompt + answers[i][:-1]], TOK.pad_id)
        full = model.forward(ids_BT, mask_BT)[0, len(prompt) - 1:]
        assert (torch.stack(logits[i]) - full).abs().max() < TOLERANCE


def test_transformers_reference_agrees(tiny_dir):
    """The cached path against transformers' model with the single-process reference MoE."""
    model = EPModel.load(tiny_dir, None, group=None, device=CPU)
    answers, logits = cached_greedy(model, PROMPTS[:2], steps=3)
    reference = load_reference(tiny_dir)
    for prompt, answer, rows in zip(PROMPTS, answers, logits.values()):
        expected = reference_logits(reference, torch.tensor([prompt + answer[:-1]]))[0, len(prompt) - 1:]
        assert (torch.stack(rows) - expected).abs().max() < TOLERANCE


def test_sequences_joining_late_change_nothing(model):
    alone = [cached_greedy(model, [p], steps=4)[0][0] for p in PROMPTS]
    assert cached_greedy(model, PROMPTS, steps=4, join_at=2)[0] == alone


def test_cache_blocks_are_reserved_and_freed():
    shape = CacheShape(num_layers=2, num_blocks=4, block_size=4, width=3)
    cache = KVCache(shape, CPU, torch.float32)
    cache.admit("a", 9)  # 3 blocks
    assert cache.free_blocks == 1
    with pytest.raises(AssertionError, match="needs 2 blocks, 1 are free"):
        cache.admit("b", 5)
    plan = cache.plan([], [("a", 5)])
    assert plan.write_N.tolist() == [0, 1, 2, 3, 4] and plan.last_S.tolist() == [4]
    plan = cache.plan(["a"], [])
    assert plan.write_N.tolist() == [5] and plan.context_B.tolist() == [6]
    cache.release("a")
    assert cache.free_blocks == 4
    with pytest.raises(ValueError, match="holds no block"):
        CacheShape.for_budget(__import__("moeplace.runtime.tiny", fromlist=["x"]).tiny_config(), 10, 16, torch.float32)


def test_memory_budget_decides_admission(tiny_dir):
    """A budget of two sequences' blocks: five requests are served two at a time, all answered right."""
    model = EPModel.load(tiny_dir, None, group=None, device=CPU)
    steps, block = 4, 16
    prompts = [TOK.encode(f"Experts on GPUs {c}") for c in "abcde"]  # 2 blocks each with the answer
    assert {-(-(len(p) + steps) // block) for p in prompts} == {2}
    budget = 4 * block_bytes(model.config, block, torch.float32)
    engine = Engine(model, EngineConfig(max_batch=8, kv_cache_bytes=budget, block_size=block), None, eos_id=-1)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        engine.submit([1] * 200, SamplingParams(max_tokens=steps))
    peak = []
    engine.on_step = lambda _: peak.append(engine.loads[0].sequences)
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=steps)) for p in prompts]
        answers = [list(h.result(timeout=120).token_ids) for h in handles]
    finally:
        engine.stop()
        loop.join(timeout=60)
    assert max(peak) == 2
    assert answers == greedy_continue(model, prompts, steps, TOK.pad_id)
