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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moeplace.runtime.batch import pad_right

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


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "length" | "stop"


@dataclass
class _Sequence:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    future: Future
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


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
    """Rank 0's scheduler. `submit` is thread-safe; `run` loops until `stop`."""

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

    # -- API used by the server (any thread) ---------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int | None = None) -> Future:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, the limit is {self.config.max_prompt_tokens}")
        if not 1 <= max_tokens <= self.config.max_new_tokens:
            raise ValueError(f"max_tokens must be in 1..{self.config.max_new_tokens}, got {max_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if seed is not None and not 0 <= seed < 2**63:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in 0..2**63-1, got {seed}")
        if not self.alive():
            raise QueueFull("the engine has stopped")
        seq = _Sequence(list(prompt_ids), max_tokens, float(temperature), seed, Future())
        if temperature > 0:
            seq.generator = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**31)
        try:
            self._incoming.put_nowait(seq)
        except queue.Full:
            raise QueueFull(f"{self.config.queue_limit} requests are waiting") from None
        return seq.future

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
        finally:
            self._stopping.set()
            self._looping.clear()
            _finish(self._take_flushes())
            _broadcast(("stop",), self.control_group)
            while True:  # waiting requests too, or their clients would wait forever
                try:
                    self._running.append(self._incoming.get_nowait())
                except queue.Empty:
                    break
            for seq in self._running:
                if not seq.future.done():
                    seq.future.set_exception(RuntimeError("server is shutting down"))

    def _admit(self) -> None:
        block = not self._running
        while len(self._running) < self.config.max_batch:
            try:
                seq = self._incoming.get(timeout=0.05) if block else self._incoming.get_nowait()
            except queue.Empty:
                return
            if seq.future.set_running_or_notify_cancel():
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
        batch = self._running
        ids_BT, mask_BT = pad_right([s.prompt_ids + s.generated for s in batch], self.pad_id)
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
            token = _sample(logits_V, seq.temperature, seq.generator)
            seq.generated.append(token)
            if token == self.eos_id or len(seq.generated) >= seq.max_tokens:
                reason = "stop" if token == self.eos_id else "length"
                tokens = seq.generated[:-1] if token == self.eos_id else seq.generated
                seq.future.set_result(Completion(tokens, len(seq.prompt_ids), reason))
            else:
                still.append(seq)
        self._running = still
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(time.perf_counter() - start, len(batch), step_tokens))


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


def _sample(logits_V: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(torch.argmax(logits_V))
    # Shift by the max before dividing: logits / a tiny temperature overflow to inf, softmax to NaN.
    probs = torch.softmax((logits_V.double() - logits_V.max()) / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _broadcast(message, group):
    """Rank 0 sends `message` to every rank of the control group; others return what it sent."""
    if group is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
