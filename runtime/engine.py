"""Continuous-batching generation over an `EPModel` spread across ranks.

Rank 0 owns the request queue (fed by the HTTP server) and runs `Engine.run` in a thread: each step
it takes the running sequences plus newly arrived ones (up to `max_batch`), broadcasts the batch on
a gloo control group, and every rank runs the model's forward together (`worker_loop` on ranks
1..P-1). The model recomputes the whole sequence each step (no KV cache): the embedded model is
tiny, and recomputation keeps a sequence's logits independent of what it was batched with.

Expert statistics stay on the GPUs between collects: about once a second (`stats_interval`, or when
`flush_stats` asks), rank 0 marks a step (or an idle tick) as a collect, every rank then calls the
model's `collect_stats` together, and rank 0 hands the window to `on_stats` (metrics, recorder).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moeplace.runtime.batch import pad_right
from moeplace.runtime.requests import FinishReason, Request
from moeplace.runtime.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from moeplace.runtime.model import WindowStats


class QueueFull(Exception):
    """The request queue is at its limit: the server answers 503 with Retry-After."""


@dataclass(slots=True)
class EngineConfig:
    max_batch: int = 8
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    queue_limit: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prompt_tokens", "max_new_tokens", "queue_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine: '{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class _Sequence:
    request: Request
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def ids(self) -> list[int]:
        return [*self.request.prompt_ids, *self.generated]


@dataclass(frozen=True)
class StepStats:
    """What the last step did, for /metrics."""

    seconds: float
    batch: int
    tokens: int


@dataclass(frozen=True)
class StatsWindow:
    """The expert statistics of the steps between two collects: wall-clock span [start, end], steps and
    tokens (host counts), and the model's WindowStats (counts_LE, gpu_load_LG, samples_TLK)."""

    start: float
    end: float
    steps: int
    tokens: int
    stats: WindowStats


class Engine:
    """Rank 0's scheduler. `submit` is thread-safe; `run` loops until `stop`.

    What the server uses, and all it may use: `submit(prompt_ids, SamplingParams) -> Request` (the handle
    in runtime/requests.py: events Token / Finished / Failed, `cancel()`, `result()`), `alive()`,
    `error`, `stop()`, `queued()`, `flush_stats(then)`, and the callbacks `on_step` / `on_stats`."""

    def __init__(self, model, config: EngineConfig, control_group, eos_id: int, pad_id: int = 0,
                 resharder=None) -> None:
        self.model = model
        self.resharder = resharder
        self.config = config
        self.control_group = control_group
        self.eos_id, self.pad_id = eos_id, pad_id
        self._incoming: queue.Queue[_Sequence] = queue.Queue(maxsize=config.queue_limit)
        self._running: list[_Sequence] = []
        self._stopping = threading.Event()
        self.on_step = None  # optional callback(StepStats), set by the server for metrics
        self.on_stats = None  # optional callback(StatsWindow), after each collect
        self.stats_interval = 1.0  # seconds between collects of the expert statistics
        self.steps = 0
        self._window = [time.time(), 0, 0]  # start, steps, tokens since the last collect
        self._flushes: queue.SimpleQueue[_Flush] = queue.SimpleQueue()  # asked by flush_stats
        self._looping = threading.Event()  # set while `run` loops
        self.error: BaseException | None = None  # what ended `run`, if it failed

    # -- API used by the server (any thread) ---------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a generation; ValueError for a prompt or params this engine refuses, QueueFull when too
        many wait (or the engine has stopped)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, the limit is {self.config.max_prompt_tokens}")
        if params.max_tokens > self.config.max_new_tokens:
            raise ValueError(f"max_tokens must be in 1..{self.config.max_new_tokens}, got {params.max_tokens}")
        if not self.alive():
            raise QueueFull("the engine has stopped")
        seq = _Sequence(Request(prompt_ids, params), generator=params.generator())
        try:
            self._incoming.put_nowait(seq)
        except queue.Full:
            raise QueueFull(f"{self.config.queue_limit} requests are waiting") from None
        return seq.request

    def flush_stats(self, then=None, timeout: float = 30.0) -> None:
        """Collect the expert statistics at the next step boundary (every rank takes part), hand them to
        `on_stats`, then call `then()` in the engine's thread before any further step; returns when done
        and raises what `then` raised. Where the engine loop is not running, there is nothing to collect
        and `then()` runs at once. TimeoutError when no collect came within `timeout` seconds."""
        flush = _Flush(then)
        self._flushes.put(flush)
        deadline = time.monotonic() + timeout
        while not flush.done.wait(0.05):
            if not self._looping.is_set():
                _finish(self._take_flushes())
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not collect its statistics within {timeout} s")
        if flush.error is not None:
            raise flush.error

    def queued(self) -> int:
        return self._incoming.qsize() + len(self._running)

    def stop(self) -> None:
        self._stopping.set()

    def alive(self) -> bool:
        """False once `run` has ended (stopped, or failed): /health says so and requests are refused."""
        return not self._stopping.is_set()

    # -- the loop (one thread on rank 0) -------------------------------------------------------
    def run(self) -> None:
        self._looping.set()
        try:
            while not self._stopping.is_set():
                self._admit()
                if self._running:
                    self.step()
                else:
                    self._tick()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._stopping.set()
            self._looping.clear()
            _finish(self._take_flushes())
            if self.error is None:  # after a failed collective the other ranks may be gone
                _broadcast(("stop",), self.control_group)
            self._fail_all("the engine has stopped" if self.error else "server is shutting down")

    def _fail_all(self, message: str) -> None:
        """Waiting requests too, or their clients would wait forever."""
        while True:
            try:
                self._running.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        for seq in self._running:
            seq.request.fail(message)

    def _admit(self) -> None:
        block = not self._running
        while len(self._running) < self.config.max_batch:
            try:
                seq = self._incoming.get(timeout=0.05) if block else self._incoming.get_nowait()
            except queue.Empty:
                return
            if seq.request.cancelled:
                seq.request.finish(FinishReason.CANCELLED)
                continue
            self._running.append(seq)
            block = False

    def _tick(self) -> None:
        """No sequence to step: still hand pending reshard actions (layer swaps) and a due collect of the
        expert statistics to every rank."""
        actions = self.resharder.due_actions() if self.resharder else []
        collect = self._collect_due()
        if actions or collect:
            _broadcast(("tick", actions, collect), self.control_group)
            _apply(self.resharder, actions)
            if collect:
                self._collect()

    def _collect_due(self) -> bool:
        start, steps, _ = self._window
        return not self._flushes.empty() or (steps > 0 and time.time() - start >= self.stats_interval)

    def _collect(self) -> None:
        """Every rank sums its window of expert statistics (model.collect_stats, a collective)."""
        flushes = self._take_flushes()  # those asked from here on wait for the next collect
        try:
            stats = self.model.collect_stats()
            now = time.time()
            window = StatsWindow(self._window[0], now, self._window[1], self._window[2], stats)
            self._window = [now, 0, 0]
            if self.on_stats is not None:
                self.on_stats(window)
        finally:
            _finish(flushes)

    def _take_flushes(self) -> list[_Flush]:
        flushes = []
        while True:
            try:
                flushes.append(self._flushes.get_nowait())
            except queue.Empty:
                return flushes

    def step(self) -> None:
        start = time.perf_counter()
        self._drop_cancelled()
        batch = self._running
        if not batch:
            return
        ids_BT, mask_BT = pad_right([s.ids for s in batch], self.pad_id)
        actions = self.resharder.due_actions() if self.resharder else []
        collect = self._collect_due()
        _broadcast(("step", actions, ids_BT, mask_BT, collect), self.control_group)
        _apply(self.resharder, actions)
        logits_BTV = self.model.forward(ids_BT, mask_BT)
        self._window[1] += 1
        step_tokens = int(mask_BT.sum())
        self._window[2] += step_tokens
        if collect:
            self._collect()
        last_BV = logits_BTV[torch.arange(len(batch)), mask_BT.sum(1) - 1]
        still = []
        for seq, logits_V in zip(batch, last_BV):
            if self._advance(seq, sample(logits_V, seq.request.params, seq.generator)):
                still.append(seq)
        self._running = still
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(time.perf_counter() - start, len(batch), step_tokens))

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Hand `token` to the request; False once the sequence has ended."""
        params = seq.request.params
        if token == self.eos_id or token in params.stop_token_ids:
            seq.request.finish(FinishReason.STOP)
            return False
        seq.generated.append(token)
        seq.request.emit(token)
        if len(seq.generated) >= params.max_tokens:
            seq.request.finish(FinishReason.LENGTH)
            return False
        return True

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the batch before the step: their slots go to waiting ones."""
        for seq in self._running:
            if seq.request.cancelled:
                seq.request.finish(FinishReason.CANCELLED)
        self._running = [seq for seq in self._running if not seq.request.cancelled]


@dataclass
class _Flush:
    """One flush_stats call: what to run after the collect, set when done, what it raised."""

    then: object
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _finish(flushes: list[_Flush]) -> None:
    for flush in flushes:
        try:
            if flush.then is not None:
                flush.then()
        except Exception as exc:  # noqa: BLE001 - handed to the caller of flush_stats, not the engine loop
            flush.error = exc
        finally:
            flush.done.set()


def worker_loop(model, control_group, resharder=None) -> None:
    """Ranks 1..P-1: apply the actions, run every step and collect rank 0 broadcasts, until it says stop."""
    while True:
        message = _broadcast(None, control_group)
        if message[0] == "stop":
            return
        _apply(resharder, message[1])
        if message[0] == "step":
            model.forward(message[2], message[3])
        if message[-1]:  # rank 0 collects the expert statistics after this step
            model.collect_stats()


def _apply(resharder, actions: list) -> None:
    """Reshard actions take effect between two steps, on every rank in the same order."""
    for action in actions:
        resharder.apply(action)


def _broadcast(message, group):
    """Rank 0 sends `message` to every rank of the control group; others return what it sent."""
    if group is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
