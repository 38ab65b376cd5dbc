"""The HTTP API on rank 0 (FastAPI): OpenAI-style completions, health, Prometheus metrics, placement.

Every error a client can cause is a 4xx with a JSON `{"error": reason}`; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from moeplace.placement import placement_from_dict, placement_to_json
from moeplace.runtime.engine import Engine, QueueFull, StatsWindow, StepStats
from moeplace.runtime.model import check_placement
from moeplace.runtime.recorder import Recorder
from moeplace.runtime.requests import Completion, Failed, Finished, RequestFailed, Token
from moeplace.runtime.requests import Request as Handle
from moeplace.runtime.reshard import ReshardBusy
from moeplace.runtime.sampling import SamplingParams
from moeplace.runtime.synthetic import expert_bytes
from moeplace.trace import trace_to_bytes

MAX_BODY_BYTES = 1 << 20


class CompletionRequest(BaseModel):
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    seed: int | None = None
    model: str | None = None


class ProfileRequest(BaseModel):
    window_seconds: float = Field(1.0, ge=0.01, le=3600)
    sample_rate: float = Field(0.0, ge=0, le=1)


class Metrics:
    """Prometheus series of one server (own registry: no process-global state)."""

    def __init__(self, model, recorder: Recorder | None = None) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("moeplace_step_seconds", "Wall time of one engine step", registry=self.registry)
        self.requests = Counter("moeplace_requests", "Completion requests by outcome", ["outcome"], registry=self.registry)
        self.tokens = Counter("moeplace_generated_tokens", "Tokens generated", registry=self.registry)
        self.balancedness = Gauge("moeplace_layer_balancedness", "Mean / max GPU load of each MoE layer over the "
                                  "last collected window (about a second)", ["layer"], registry=self.registry)
        self.rank_tokens = Counter("moeplace_rank_routed_tokens", "Routed (token, expert) pairs served per rank",
                                   ["rank"], registry=self.registry)
        self.reshards = Gauge("moeplace_reshard_jobs", "Reshard jobs by state", ["state"], registry=self.registry)
        self.reshard_layers = Gauge("moeplace_reshard_layers_done", "Layers swapped by the newest reshard",
                                    registry=self.registry)
        self.model = model
        self.recorder = recorder

    def observe_reshards(self, jobs: dict) -> None:
        """Scrape time: how many reshards ended in each state, and the newest one's progress."""
        for state in ("pending", "running", "rolling_back", "done", "rolled_back", "failed"):
            self.reshards.labels(state=state).set(sum(j.state == state for j in jobs.values()))
        if jobs:
            self.reshard_layers.set(max(jobs.values(), key=lambda j: j.started).layers_done)

    def observe_step(self, stats: StepStats) -> None:
        self.step_seconds.observe(stats.seconds)
        self.tokens.inc(stats.batch)

    def observe_window(self, window: StatsWindow) -> None:
        """A collected window of expert statistics (about one a second): recorder, balance, per-rank load."""
        stats = window.stats
        if self.recorder is not None:
            self.recorder.add(window.start, window.tokens, stats.counts_LE, stats.samples_TLK)
        for layer, load_G in zip(self.model.config.moe_layers, stats.gpu_load_LG):
            if load_G.sum() > 0:
                self.balancedness.labels(layer=str(layer)).set(float(load_G.mean() / load_G.max()))
            for rank, value in enumerate(load_G.tolist()):
                self.rank_tokens.labels(rank=str(rank)).inc(value)


def create_app(engine: Engine, model, tokenizer, model_name: str, api_key: str | None = None,
               resharder=None) -> FastAPI:
    app = FastAPI(title="moeplace", docs_url=None, redoc_url=None)
    cfg = model.config
    recorder = Recorder(cfg.moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers,
                        cfg.n_group, cfg.topk_group)
    metrics = Metrics(model, recorder)
    engine.on_step = metrics.observe_step
    engine.on_stats = metrics.observe_window
    app.state.ready = True

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # inside require_key: strangers' bodies are never read

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        # Every endpoint but /health needs the key once one is set (binding off loopback needs one).
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        # Starlette's own answers (404, 405, a body FastAPI cannot parse) in the same {"error": ...} shape.
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.get("/health")
    async def health():
        if not engine.alive():
            return _error(503, "the engine has stopped")
        return {"status": "ok"} if app.state.ready else _error(503, "starting")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        try:
            prompt_ids = tokenizer.encode(body.prompt)  # UnicodeEncodeError (a ValueError) for lone surrogates
            params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, seed=body.seed)
            handle = engine.submit(prompt_ids, params)
        except QueueFull as exc:
            metrics.requests.labels(outcome="rejected").inc()
            return _error(503, f"server busy: {exc}", headers={"Retry-After": "1"})
        except ValueError as exc:
            metrics.requests.labels(outcome="invalid").inc()
            return _error(400, str(exc))
        try:
            done = await _result(handle)
        except RequestFailed as exc:  # the engine stopped before this request finished
            return _error(503, str(exc))
        metrics.requests.labels(outcome="ok").inc()
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:16]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model or model_name,
            "choices": [{"index": 0, "text": tokenizer.decode(done.token_ids), "finish_reason": done.finish_reason.value}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
                      "total_tokens": done.prompt_tokens + len(done.token_ids)},
        }

    @app.get("/metrics")
    async def prometheus():
        if resharder is not None:
            metrics.observe_reshards(dict(resharder.jobs))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/moeplace/placement")
    async def placement():
        return PlainTextResponse(placement_to_json(model.placement), media_type="application/json")

    @app.post("/moeplace/profile/start")
    async def profile_start(body: ProfileRequest | None = None):
        body = body or ProfileRequest()

        def start() -> None:  # in the engine's thread, right after a collect: the first window starts clean
            recorder.start(body.window_seconds, body.sample_rate)
            model.sample_rate = body.sample_rate
            engine.stats_interval = min(1.0, body.window_seconds)

        if (busy := await _flush(start)) is not None:
            return busy
        return {"recording": True, "window_seconds": recorder.window_seconds, "sample_rate": recorder.sample_rate}

    @app.post("/moeplace/profile/stop")
    async def profile_stop():
        if (busy := await _flush(_stop_recording)) is not None:
            return busy
        return {"recording": False}

    async def _flush(then=None) -> JSONResponse | None:
        try:
            await asyncio.to_thread(engine.flush_stats, then)
        except TimeoutError as exc:
            return _error(503, str(exc), headers={"Retry-After": "1"})
        return None

    def _stop_recording() -> None:  # in the engine's thread, right after the last window was recorded
        recorder.stop()
        model.sample_rate = 0.0
        engine.stats_interval = 1.0

    @app.get("/moeplace/profile/dump")
    async def profile_dump():
        if recorder.recording and (busy := await _flush()) is not None:  # the latest steps' counts are on the GPUs
            return busy
        try:
            trace = recorder.trace({"engine": "moeplace", "model": model_name,
                                    "placement": placement_to_json(model.placement),
                                    "expert_bytes": str(expert_bytes(model.config))})  # for solve's estimates
        except ValueError as exc:
            return _error(409, str(exc))
        return Response(trace_to_bytes(trace), media_type="application/octet-stream")

    @app.put("/moeplace/placement")
    async def reshard(request: Request):
        if resharder is None:
            return _error(404, "live reshard is not enabled on this server")
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return _error(400, "body is not JSON")
        try:
            new = placement_from_dict(body, "request body")
            check_placement(new, model.config, model.placement.topology.num_gpus, "the served model")
            job = resharder.submit(new)
        except ReshardBusy as exc:
            return _error(409, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse(job.to_json(), status_code=202, headers={"Location": f"/moeplace/reshard/{job.id}"})

    @app.get("/moeplace/reshard/{job_id}")
    async def reshard_status(job_id: str):
        job = resharder.jobs.get(job_id) if resharder else None
        return job.to_json() if job else _error(404, f"no reshard job {job_id!r}")

    return app


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before any endpoint sees it,
    whether announced by Content-Length or sent chunked, which no header announces. The body (at most
    `limit` bytes) is read here and replayed to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = lambda: _error(413, f"request body over {self.limit} bytes")  # noqa: E731
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big()(scope, receive, send)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)


async def events(handle: Handle):
    """The handle's events as they come, without a thread per request: the engine's thread wakes this loop."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    handle.set_waker(lambda: loop.call_soon_threadsafe(wake.set))
    try:
        while True:
            wake.clear()  # before polling: an event pushed after the poll sets it again
            event = handle.poll()
            if event is None:
                await wake.wait()
                continue
            yield event
            if not isinstance(event, Token):
                return
    finally:
        handle.set_waker(None)
        handle.cancel()  # a no-op once ended; else the client is gone: free the slot


async def _result(handle: Handle) -> Completion:
    """A non-streaming answer: every token, then how it ended; RequestFailed if the engine failed it."""
    ids = []
    async for event in events(handle):
        match event:
            case Token(id=token_id):
                ids.append(token_id)
            case Finished(reason=reason):
                return Completion(tuple(ids), len(handle.prompt_ids), reason)
            case Failed(message=message):
                raise RequestFailed(message)
    raise AssertionError("events() ends only after Finished or Failed")


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)
