"""profile_vllm against a real HTTP server answering as vLLM 0.33.0's OpenAI server does with
--enable-return-routed-experts: `routed_experts` in each completion choice, base64 `.npy` of logical
expert ids [tokens - 1, layers, top_k], uint8, dense layers' rows left zero (read in vLLM's code:
entrypoints/openai/completion/protocol.py, utils/serial_utils.py, routed_experts_capturer.py)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from http_fixture import serving
from moeplace.profiler.vllm import decode_routed_experts, profile_vllm

LAYERS, DENSE, TOP_K, EXPERTS = 61, 3, 8, 256  # DeepSeek-V3


def routing(prompt: str, max_tokens: int) -> np.ndarray:
    """The fixture model's routing: [len(prompt) + max_tokens - 1, 61, 8] uint8, dense rows zero."""
    rng = np.random.default_rng(sum(prompt.encode()))
    T = len(prompt.encode()) + max_tokens - 1
    ids = np.zeros((T, LAYERS, TOP_K), dtype=np.uint8)
    popular = rng.permutation(EXPERTS)[:40]  # a skewed router: 40 experts take most tokens
    for t in range(T):
        for layer in range(DENSE, LAYERS):
            pool = popular if rng.random() < 0.7 else np.arange(EXPERTS)
            ids[t, layer] = rng.choice(pool, TOP_K, replace=False)
    return ids


class FakeVLLM:
    def __init__(self) -> None:
        self.return_routed_experts = True
        self.api_key: str | None = None
        self.requests: list[dict] = []


def vllm_app(state: FakeVLLM) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.headers.get("Authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "deepseek-ai/DeepSeek-V3", "object": "model", "owned_by": "vllm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state.requests.append(body)
        if body.get("max_tokens", 16) < 1:
            return JSONResponse({"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError",
                                           "param": "max_tokens", "code": 400}}, status_code=400)
        buffer = io.BytesIO()
        np.save(buffer, routing(body["prompt"], body["max_tokens"]), allow_pickle=False)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii") if state.return_routed_experts else None
        choice = {"index": 0, "text": "x" * body["max_tokens"], "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None,
                  "routed_experts": encoded, "weight_versions": None}
        return {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": len(body["prompt"]), "total_tokens": 0}}

    return app


@pytest.fixture(scope="module")
def server():
    state = FakeVLLM()
    with serving(vllm_app(state)) as url:
        yield state, url


@pytest.fixture
def vllm(server):
    state, url = server
    state.return_routed_experts, state.api_key, state.requests = True, None, []
    return state, url


PROMPTS = ["The capital of France is", "def fib(n):", "Explain mixture of experts"]


def test_trace_holds_every_routed_token(vllm):
    state, url = vllm
    trace = profile_vllm(url, PROMPTS, max_tokens=4)
    expected = [routing(p, 4)[:, DENSE:] for p in PROMPTS]
    assert trace.layers.tolist() == list(range(DENSE, LAYERS)) and trace.num_model_layers == LAYERS
    assert (trace.top_k, trace.n_group, trace.topk_group, trace.num_experts) == (8, 8, 4, 256)
    np.testing.assert_array_equal(trace.topk_ids_TLK, np.concatenate(expected))
    assert trace.tokens_W.tolist() == [len(e) for e in expected]
    for w, ids in enumerate(expected):  # one window per request, counts from its tokens
        for l in (0, 30, 57):
            np.testing.assert_array_equal(trace.counts_WLE[w, l], np.bincount(ids[:, l].ravel(), minlength=256))
    assert trace.metadata["engine"] == "vllm" and trace.metadata["model"] == "deepseek-ai/DeepSeek-V3"
    assert [r["model"] for r in state.requests] == ["deepseek-ai/DeepSeek-V3"] * 3
    assert all(r["temperature"] == 0.0 and r["max_tokens"] == 4 for r in state.requests)


def test_server_without_the_flag_is_named(vllm):
    state, url = vllm
    state.return_routed_experts = False
    with pytest.raises(ValueError, match="no 'routed_experts': start vLLM with --enable-return-routed-experts"):
        profile_vllm(url, PROMPTS[:1])


def test_errors_come_back_as_one_line(vllm):
    state, url = vllm
    with pytest.raises(ValueError, match="HTTP 400: max_tokens must be at least 1"):
        profile_vllm(url, PROMPTS[:1], max_tokens=0)
    state.api_key = "k"
    with pytest.raises(ValueError, match="v1/models: HTTP 401: Unauthorized"):
        profile_vllm(url, PROMPTS[:1])
    assert profile_vllm(url, PROMPTS[:1], api_key="k", max_tokens=2).num_windows == 1
    with pytest.raises(ValueError, match="cannot reach the server"):
        profile_vllm("http://127.0.0.1:9", PROMPTS[:1], timeout=2)


def test_other_shapes_need_the_expert_count():
    buffer = io.BytesIO()
    np.save(buffer, np.array([[[0, 1]], [[2, 3]]], dtype=np.uint8))
    ids = decode_routed_experts(base64.b64encode(buffer.getvalue()).decode(), "here")
    assert ids.shape == (2, 1, 2)
    with pytest.raises(ValueError, match="here: 'routed_experts' is not base64 .npy data"):
        decode_routed_experts("not base64!", "here")
    with pytest.raises(ValueError, match="must be a base64 string"):
        decode_routed_experts(3, "here")
