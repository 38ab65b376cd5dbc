"""The server <-> engine request API: SamplingParams and `sample`, the Request handle's events,
cancel() freeing a slot, and a failed engine failing every request, on a real single-process engine."""

from __future__ import annotations

import threading

import pytest
import torch

from moeplace.runtime.engine import Engine, EngineConfig
from moeplace.runtime.model import EPModel
from moeplace.runtime.requests import Failed, Finished, FinishReason, Request, RequestFailed, Token
from moeplace.runtime.sampling import SamplingParams, sample
from moeplace.runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("fields, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"temperature": float("inf")}, "temperature must be a finite"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"seed": -1}, "seed must be an integer in 0..2\\*\\*63-1"),
    ({"seed": 2**63}, "seed must be"),
    ({"stop": ("a", "b", "c", "d", "e")}, "at most 4 strings"),
    ({"stop": ("",)}, "stop strings must be 1..64 characters"),
    ({"stop": ["a"]}, "stop must be at most"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids must be"),
])
def test_sampling_params_refuse_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_sample_greedy_top_p_and_seed():
    logits_V = torch.tensor([2.0, 1.5, 1.0, -5.0])  # softmax ~ [0.55, 0.33, 0.20, 0.0003]
    assert sample(logits_V, SamplingParams(), None) == 0
    draws = lambda params, n=400: [sample(logits_V, params, g) for g in [params.generator()] for _ in range(n)]  # noqa: E731
    everything = draws(SamplingParams(temperature=1.0, seed=3))
    assert set(everything) >= {0, 1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3))) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=3))) == {0}  # the top token always stays
    assert draws(SamplingParams(temperature=1.0, seed=3)) == everything  # a seed draws the same tokens
    assert sample(torch.tensor([0.0, 1e4]), SamplingParams(temperature=5e-324, seed=1), None) == 1  # no NaN


def test_request_events_and_result_across_threads():
    request = Request([1, 2], SamplingParams(max_tokens=3))
    woken = []
    request.set_waker(lambda: woken.append(1))
    producer = threading.Thread(target=lambda: (request.emit(7), request.emit(8), request.finish(FinishReason.LENGTH)))
    producer.start()
    done = request.result(timeout=10)
    producer.join()
    assert done.token_ids == (7, 8) and done.prompt_tokens == 2 and done.finish_reason is FinishReason.LENGTH
    assert len(woken) == 3
    request.fail("late")  # a request ends once
    assert request.poll() is None and request.ended
    failed = Request([1], SamplingParams())
    failed.fail("engine gone")
    with pytest.raises(RequestFailed, match="engine gone"):
        failed.result(timeout=1)
    with pytest.raises(TimeoutError):
        Request([1], SamplingParams()).result(timeout=0.01)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))
    engine = Engine(model, EngineConfig(max_batch=1), None, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    loop = threading.Thread(target=engine.run, name="engine")
    loop.start()
    yield engine
    engine.stop()
    loop.join(timeout=60)


def test_engine_streams_tokens_then_finishes(engine):
    request = engine.submit(TOK.encode("expert routing"), SamplingParams(max_tokens=4))
    events = [request.next_event(timeout=60) for _ in range(5)]
    assert all(isinstance(e, Token) for e in events[:4]) and events[4] == Finished(FinishReason.LENGTH)
    again = engine.submit(TOK.encode("expert routing"), SamplingParams(max_tokens=4)).result(timeout=60)
    assert again.token_ids == tuple(e.id for e in events[:4])
    stop_id = again.token_ids[1]
    stopped = engine.submit(TOK.encode("expert routing"), SamplingParams(max_tokens=4, stop_token_ids=(stop_id,)))
    assert stopped.result(timeout=60).token_ids == again.token_ids[:1]  # the stop id is not included


def test_cancel_frees_the_slot(engine):
    """max_batch 1: a long request cancelled lets the next one run at once."""
    long = engine.submit(TOK.encode("a"), SamplingParams(max_tokens=256))
    assert isinstance(long.next_event(timeout=60), Token)
    waiting = engine.submit(TOK.encode("b"), SamplingParams(max_tokens=1))
    long.cancel()
    assert waiting.result(timeout=60).finish_reason is FinishReason.LENGTH
    events = []
    while not isinstance(event := long.next_event(timeout=60), Finished):
        events.append(event)
    assert event.reason is FinishReason.CANCELLED and len(events) < 255
    blocker = engine.submit(TOK.encode("c"), SamplingParams(max_tokens=256))
    queued = engine.submit(TOK.encode("d"), SamplingParams(max_tokens=1))
    queued.cancel()  # before it was admitted: it never runs
    blocker.cancel()
    assert queued.result(timeout=60).finish_reason is FinishReason.CANCELLED


def test_a_failing_engine_fails_every_request(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))
    engine = Engine(model, EngineConfig(max_batch=2), None, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    requests = [engine.submit(TOK.encode(p), SamplingParams(max_tokens=8)) for p in ("a", "b", "c")]
    model.step = lambda *_: (_ for _ in ()).throw(RuntimeError("rank 1 is gone"))  # what every step calls
    loop = threading.Thread(target=lambda: pytest.raises(RuntimeError, engine.run), name="engine")
    loop.start()
    loop.join(timeout=120)
    assert not loop.is_alive() and isinstance(engine.error, RuntimeError) and not engine.alive()
    for request in requests:
        assert isinstance(request.next_event(timeout=1), Failed)
