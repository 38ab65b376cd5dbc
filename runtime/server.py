"""The HTTP API on rank 0 (FastAPI): OpenAI-style completions (runtime/completions.py), health,
Prometheus metrics, the live placement, profiling.

Every error a client can cause is a 4xx with a JSON `{"error": reason}`; the server keeps serving.
Bodies are read by `Gate` (the API key first, then at most MAX_BODY_BYTES) and parsed as strict JSON.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from moeplace.placement import placement_from_dict, placement_to_json
from moeplace.runtime.api import BadRequest, describe, parse_json
from moeplace.runtime.completions import add_routes
from moeplace.runtime.engine import Engine
from moeplace.runtime.guard import check_fits_served
from moeplace.runtime.metrics import Metrics
from moeplace.runtime.model import check_placement
from moeplace.runtime.recorder import Recorder
from moeplace.runtime.reshard_jobs import ReshardBusy
from moeplace.runtime.synthetic import expert_bytes
from moeplace.trace import trace_to_bytes

MAX_BODY_BYTES = 1 << 20


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_seconds: float = Field(1.0, ge=0.01, le=3600)
    sample_rate: float = Field(0.0, ge=0, le=1)


class RecordingBusy(Exception):
    """profile/start while recording: 409."""


def create_app(engine: Engine, model, tokenizer, model_name: str, api_key: str | None = None,
               resharder=None) -> FastAPI:
    app = FastAPI(title="moeplace", docs_url=None, redoc_url=None)
    cfg = model.config
    recorder = Recorder(cfg.moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers,
                        cfg.n_group, cfg.topk_group)
    metrics = Metrics(model, recorder)
    engine.on_step = metrics.observe_step
    engine.on_stats = metrics.observe_window
    app.add_middleware(Gate, api_key=api_key, limit=MAX_BODY_BYTES)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        # Starlette's own answers (404, 405) in the same {"error": ...} shape.
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"} if engine.alive() else _error(503, "the engine has stopped")

    add_routes(app, engine, tokenizer, model_name, metrics, _error)

    @app.get("/metrics")
    async def prometheus():
        if resharder is not None:
            metrics.observe_reshards(resharder.jobs.all())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/moeplace/placement")
    async def placement():
        return PlainTextResponse(placement_to_json(model.placement), media_type="application/json")

    @app.post("/moeplace/profile/start")
    async def profile_start(request: Request):
        try:
            body = await request.body()
            options = ProfileRequest.model_validate(parse_json(body) if body.strip() else {})
        except BadRequest as exc:
            return _error(400, str(exc))
        except ValidationError as exc:
            return _error(400, describe(exc.errors()))
        def start() -> None:  # in the engine's thread, right after a collect: the first window starts clean
            if recorder.recording:  # starting again would silently drop the recording in progress
                raise RecordingBusy("a recording is in progress: POST /moeplace/profile/stop first")
            recorder.start(options.window_seconds, options.sample_rate)
            model.sample_rate = options.sample_rate
            engine.stats_interval = min(1.0, options.window_seconds)

        try:
            if (busy := await _flush(start)) is not None:
                return busy
        except RecordingBusy as exc:
            return _error(409, str(exc))
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
            body = parse_json(await request.body())
            # Against the served model on the JSON values first: no array is built from a body that
            # cannot be served, and nothing too deep to pickle goes on to the other ranks.
            check_fits_served(body, model.placement, "request body")
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


class Gate:
    """ASGI middleware in front of every endpoint. 1. The API key, when one is set: every path but
    /health needs `Authorization: Bearer KEY`; a stranger's body is never read. 2. A request body over
    `limit` bytes is answered 413 before any endpoint sees it, whether announced by Content-Length or
    sent chunked, which no header announces; the body (at most `limit` bytes) is replayed to the app."""

    def __init__(self, app, api_key: str | None, limit: int) -> None:
        self.app, self.api_key, self.limit = app, api_key, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await _error(401, "missing or wrong API key (Authorization: Bearer ...)")(scope, receive, send)
        too_big = _error(413, f"request body over {self.limit} bytes")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)
