"""The request handle: how a server thread and the engine's thread talk about one generation.

`Engine.submit(prompt_ids, params)` returns a `Request`. The engine appends events as they happen
(`Token` per generated id, then exactly one `Finished` or `Failed`); the server reads them as they
come (`poll`, `next_event`, or all at once with `result`) and may `cancel()` at any time (client gone,
stop string matched): the engine drops the sequence at its next step and frees its slot.

Thread-safe: one producer (the engine), any consumer thread; `set_waker` lets an asyncio loop be
woken (with `loop.call_soon_threadsafe`) instead of blocking a thread per request.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union

from moeplace.runtime.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id (not included), or a stop string (the server's)
    LENGTH = "length"  # max_tokens generated
    CANCELLED = "cancelled"  # cancel() was called before it finished


@dataclass(frozen=True, slots=True)
class Token:
    id: int


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine could not finish the request (shutting down, engine error): a 503 for the client."""

    message: str


Event = Union[Token, Finished, Failed]


@dataclass(frozen=True, slots=True)
class Completion:
    """Everything a non-streaming answer needs: the generated ids (stop ids excluded), why it ended."""

    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: FinishReason


class RequestFailed(RuntimeError):
    """`Request.result()` of a request that ended in `Failed`."""


class Request:
    """One submitted generation. prompt_ids: the prompt's token ids; params: its SamplingParams."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompt_ids = tuple(prompt_ids)
        self.params = params
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cancelled = threading.Event()
        self._ended = False
        self._waker: Callable[[], None] | None = None

    # -- the engine's side ------------------------------------------------------------------------
    def emit(self, token_id: int) -> None:
        self._push(Token(int(token_id)))

    def finish(self, reason: FinishReason) -> None:
        self._push(Finished(reason))

    def fail(self, message: str) -> None:
        self._push(Failed(message))

    @property
    def ended(self) -> bool:
        """Finished or Failed was emitted: nothing more will come."""
        return self._ended

    def _push(self, event: Event) -> None:
        with self._lock:
            if self._ended:  # a request ends once (a shutdown may race a finish)
                return
            self._ended = not isinstance(event, Token)
            self._events.append(event)
            self._changed.notify_all()
            waker = self._waker
        if waker is not None:
            waker()

    # -- the server's side ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating: the engine frees the sequence's slot at its next step and emits
        Finished(CANCELLED) unless it ended already. Safe to call any number of times, from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """`waker()` is called (in the engine's thread) after each new event; at once if some wait."""
        with self._lock:
            self._waker = waker
            pending = bool(self._events)
        if waker is not None and pending:
            waker()

    def poll(self) -> Event | None:
        """The next event, or None if none is there yet."""
        with self._lock:
            return self._events.popleft() if self._events else None

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to `timeout` seconds (None: forever); None on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._events, timeout):
                return None
            return self._events.popleft()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends: its Completion; RequestFailed if it failed, TimeoutError after
        `timeout` seconds without an event."""
        ids: list[int] = []
        while True:
            event = self.next_event(timeout)
            match event:
                case None:
                    raise TimeoutError(f"no event within {timeout} s")
                case Token(id=token_id):
                    ids.append(token_id)
                case Finished(reason=reason):
                    return Completion(tuple(ids), len(self.prompt_ids), reason)
                case Failed(message=message):
                    raise RequestFailed(message)
