"""/v1/completions, /v1/chat/completions and /v1/models: requests to the engine, answers in OpenAI's format.

A request is submitted to the engine before any answer starts (a refusal is a plain 4xx/503), then
either collected (one JSON answer) or streamed as server-sent events: one `data: {chunk}` per piece of
text, a last chunk with `finish_reason`, optionally a usage chunk, then `data: [DONE]`. An engine
failure mid-stream is a `data: {"error": ...}` event (OpenAI's clients raise it). A client that goes
away cancels its request: the engine frees the slot at its next step.

Stop strings are matched here, on the decoded text; text that could still become a stop string is
held back until it cannot, so streamed pieces always add up to the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeplace.runtime.api import ChatRequest, CompletionRequest, _Common, parse_json, validate
from moeplace.runtime.engine import QueueFull
from moeplace.runtime.requests import Failed, Finished, FinishReason, RequestFailed, Token
from moeplace.runtime.requests import Request as Handle


class TextStream:
    """The decoded text of a growing list of token ids, released as it becomes final: never a partial
    UTF-8 character (decoded as U+FFFD until complete), never text a stop string could still claim."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max(map(len, stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token_id: int) -> str:
        """Text newly final after this token (may be ""). Sets `stopped` when a stop string appeared."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids)
        cut = self._stop_at()
        if cut is not None:
            self.stopped, self.text = True, self.text[:cut]
            return self.rest()
        end = len(self.text) - self.hold
        while end > self.sent and self.text[end - 1] == "\ufffd":  # maybe a character still arriving
            end -= 1
        return self._release(end)

    def rest(self) -> str:
        """Everything not yet released (at the end of the request)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _stop_at(self) -> int | None:
        start = max(0, self.sent - self.hold - 1)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None


@dataclass(frozen=True)
class Piece:
    """Text released by one step; finish_reason set on the last piece only."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


async def events(handle: Handle) -> AsyncIterator:
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
        handle.cancel()  # a no-op once ended; otherwise the client is gone: free the slot


async def pieces(handle: Handle, tokenizer) -> AsyncIterator[Piece]:
    """The request's text as it becomes final; RequestFailed if the engine failed it."""
    text = TextStream(tokenizer, handle.params.stop)
    async with aclosing(events(handle)) as stream:
        async for event in stream:
            match event:
                case Token(id=token_id):
                    piece = text.add(token_id)
                    if text.stopped:
                        yield Piece(piece, len(text.ids), FinishReason.STOP.value)
                        return
                    if piece:
                        yield Piece(piece, len(text.ids))
                case Finished(reason=reason):
                    finish = FinishReason.LENGTH if reason is FinishReason.LENGTH else FinishReason.STOP
                    yield Piece(text.rest(), len(text.ids), finish.value)
                case Failed(message=message):
                    raise RequestFailed(message)


def add_routes(app: FastAPI, engine, tokenizer, model_name: str, metrics, error) -> None:
    """The OpenAI-style endpoints on `app`; `error(status, reason)` makes the JSON error answers."""

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "moeplace"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, CompletionRequest, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, ChatRequest, "chat.completion", "chatcmpl")

    async def _answer(request: Request, kind: type[_Common], object_name: str, prefix: str):
        try:
            body = validate(kind, parse_json(await request.body()))
            if body.model not in (None, model_name):
                return error(404, f"model {body.model!r} is not served here (GET /v1/models lists {model_name!r})")
            prompt = body.prompt() if isinstance(body, ChatRequest) else body.prompt
            prompt_ids = tokenizer.encode(prompt)  # UnicodeEncodeError (a ValueError) for lone surrogates
            handle = engine.submit(prompt_ids, body.sampling())
        except QueueFull as exc:
            metrics.requests.labels(outcome="rejected").inc()
            return error(503, f"server busy: {exc}", headers={"Retry-After": "1"})
        except ValueError as exc:  # BadRequest, SamplingParams' and the engine's refusals
            metrics.requests.labels(outcome="invalid").inc()
            return error(400, str(exc))
        answer = Answer(object_name, f"{prefix}-{uuid.uuid4().hex[:24]}", model_name, len(prompt_ids))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(handle, answer, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, handle, answer)

    async def _collect(request: Request, handle: Handle, answer: Answer):
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        texts = []
        try:
            async for last in pieces(handle, tokenizer):
                texts.append(last.text)
        except RequestFailed as exc:  # the engine stopped before this request finished
            metrics.requests.labels(outcome="failed").inc()
            return error(503, str(exc))
        finally:
            gone = watcher.done()
            watcher.cancel()
        metrics.requests.labels(outcome="cancelled" if gone else "ok").inc()
        return JSONResponse(answer.whole("".join(texts), last))

    async def _stream(handle: Handle, answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
        last = None
        try:
            if answer.chat:
                yield _sse(answer.chunk("", None, role=True))
            async for last in pieces(handle, tokenizer):
                if last.text or last.finish_reason:
                    yield _sse(answer.chunk(last.text, last.finish_reason))
            if include_usage:
                yield _sse(answer.usage_chunk(last))
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(outcome="ok").inc()
        except RequestFailed as exc:
            metrics.requests.labels(outcome="failed").inc()
            yield _sse({"error": {"message": str(exc), "type": "server_error", "code": 503}})


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """The body is read: the next message the server receives is the client going away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class Answer:
    """The fixed parts of one answer (id, time, model) and its JSON shapes, per OpenAI's API reference."""

    object_name: str  # text_completion | chat.completion
    id: str
    model: str
    prompt_tokens: int
    created: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "created", int(time.time()))

    @property
    def chat(self) -> bool:
        return self.object_name == "chat.completion"

    def whole(self, text: str, last: Piece) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._head(self.object_name), "choices": [choice], "usage": self._usage(last)}

    def chunk(self, text: str, finish_reason: str | None, role: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
        else:
            choice["text"] = text
        return {**self._head(self._chunk_object), "choices": [choice]}

    def usage_chunk(self, last: Piece | None) -> dict:
        return {**self._head(self._chunk_object), "choices": [], "usage": self._usage(last)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _usage(self, last: Piece | None) -> dict:
        generated = last.completion_tokens if last is not None else 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}
