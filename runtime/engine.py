"""Rank 0's scheduler: requests in, sequences assigned to ranks, lockstep steps, tokens back out.

Data-parallel attention with expert-parallel MoE (DeepSeek's deployment): each rank owns the
sequences it is given (prompt, latent KV cache, sampling; runtime/ranks.py), and every rank steps
in lockstep, meeting the others in each MoE layer's all-to-all. `Engine.run` (a thread on rank 0)
loops: drop cancelled sequences, hand waiting requests to the least loaded rank that has room for
them (sequences under `max_batch`, free KV-cache blocks for prompt + max_tokens, prefill tokens of
this step under `max_prefill_tokens`), broadcast a `Step` (runtime/control.py), run rank 0's own
share, gather every rank's sampled tokens, and hand them to the requests (`Request` events). A rank
with no sequence steps an empty batch; with no sequence anywhere a `Tick` carries retirements,
reshard actions and collects alone.

Expert statistics stay on the GPUs between collects: about once a second (`stats_interval`, or when
`flush_stats` asks), rank 0 marks a step (or a tick) as a collect, every rank then calls the model's
`collect_stats` together, and rank 0 hands the window to `on_stats` (metrics, recorder). The values
handed out and the flush handshake are in runtime/engine_stats.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch.distributed as dist

from moeplace.runtime.control import Admit, Sampled, Step, Stop, Tick
from moeplace.runtime.engine_stats import StatsWindow, StepStats, _finish, _Flush
from moeplace.runtime.ranks import EngineConfig, RankWorker, broadcast, gather
from moeplace.runtime.requests import FinishReason, Request
from moeplace.runtime.sampling import SEED_LIMIT, SamplingParams

__all__ = ["Engine", "EngineConfig", "QueueFull"]


class QueueFull(Exception):
    """The request queue is at its limit: the server answers 503 with Retry-After."""


@dataclass(slots=True)
class _Sequence:
    """A request on rank 0: its sequence id, the rank serving it (-1 while waiting), tokens generated,
    cache blocks reserved on that rank, and the parameters the rank samples with (seed resolved)."""

    request: Request
    seq_id: int
    params: SamplingParams
    blocks: int
    rank: int = -1
    generated: int = 0


@dataclass(slots=True)
class _RankLoad:
    sequences: int
    free_blocks: int


class Engine:
    """Rank 0's scheduler. `submit` is thread-safe; `run` loops until `stop`.

    What the server uses, and all it may use: `submit(prompt_ids, SamplingParams) -> Request` (the handle
    in runtime/requests.py: events Token / Finished / Failed, `cancel()`, `result()`), `alive()`,
    `error`, `stop()`, `flush_stats(then)`, and the callbacks `on_step` / `on_stats`."""

    def __init__(self, model, config: EngineConfig, control_group, eos_id: int, pad_id: int = 0,
                 resharder=None) -> None:
        self.model, self.resharder, self.config = model, resharder, config
        self.control_group = control_group
        self.eos_id, self.pad_id = eos_id, pad_id
        self.worker: RankWorker | None = None  # rank 0's own sequences: made by `run`
        self.shape = config.cache_shape(model.config, model.dtype)
        world = dist.get_world_size(control_group) if control_group is not None else 1
        self.loads = [_RankLoad(0, self.shape.num_blocks) for _ in range(world)]
        self._waiting: deque[_Sequence] = deque()
        self._live: dict[int, _Sequence] = {}
        self._retire: list[int] = []  # ended sequences, freed on their ranks with the next message
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        if resharder is not None:  # a swap or a job start wakes an idle loop at once
            resharder.wake = self._arrived.set
        self._next_id = 0
        self._stopping = threading.Event()
        self.on_step = None  # optional callback(StepStats), set by the server for metrics
        self.on_stats = None  # optional callback(StatsWindow), after each collect
        self.stats_interval = 1.0  # seconds between collects of the expert statistics
        self.steps = 0
        self.on_admit = None  # optional callback(Admit): which rank serves a request (tests, logs)
        self._window = [time.time(), 0, 0]  # start, steps, tokens since the last collect
        self._flushes: deque[_Flush] = deque()  # asked by flush_stats
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
        blocks = self.shape.blocks_for(len(prompt_ids) + params.max_tokens)
        if blocks > self.shape.num_blocks:
            raise ValueError(f"prompt + max_tokens ({len(prompt_ids) + params.max_tokens} tokens) exceed the KV "
                             f"cache of a rank ({self.shape.num_blocks * self.shape.block_size} tokens)")
        if not self.alive():
            raise QueueFull("the engine has stopped")
        if not params.greedy and params.seed is None:  # drawn here: the same draws whichever rank serves it
            params = dataclasses.replace(params, seed=time.time_ns() % SEED_LIMIT)
        request = Request(prompt_ids, params)
        with self._lock:
            if len(self._waiting) >= self.config.queue_limit:
                raise QueueFull(f"{self.config.queue_limit} requests are waiting")
            self._waiting.append(_Sequence(request, self._next_id, params, blocks))
            self._next_id += 1
        self._arrived.set()
        return request

    def flush_stats(self, then=None, timeout: float = 30.0) -> None:
        """Collect the expert statistics at the next step boundary (every rank takes part), hand them to
        `on_stats`, then call `then()` in the engine's thread before any further step; returns when done
        and raises what `then` raised. Where the engine loop is not running, there is nothing to collect
        and `then()` runs at once. TimeoutError when no collect came within `timeout` seconds."""
        flush = _Flush(then)
        self._flushes.append(flush)
        self._arrived.set()
        deadline = time.monotonic() + timeout
        while not flush.done.wait(0.05):
            if not self._looping.is_set():
                _finish(self._take_flushes())
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not collect its statistics within {timeout} s")
        if flush.error is not None:
            raise flush.error

    def stop(self) -> None:
        self._stopping.set()
        self._arrived.set()

    def alive(self) -> bool:
        """False once `run` has ended (stopped, or failed): /health says so and requests are refused."""
        return not self._stopping.is_set()

    # -- the loop (one thread on rank 0) -------------------------------------------------------
    def run(self) -> None:
        self._looping.set()
        try:
            self.worker = RankWorker(self.model, self.config, 0, self.resharder)
            while not self._stopping.is_set():
                self._drop_cancelled()
                admit = self._schedule()
                if self._live:
                    self._step(admit)
                elif not self._tick():
                    self._arrived.wait(0.05)
                    self._arrived.clear()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._stopping.set()
            self._looping.clear()
            _finish(self._take_flushes())
            if self.error is None:  # after a failed collective the other ranks may be gone
                broadcast(Stop(), self.control_group)
            self._fail_all("the engine has stopped" if self.error else "server is shutting down")

    def _fail_all(self, message: str) -> None:
        """Waiting requests too, or their clients would wait forever."""
        with self._lock:
            ended = [*self._live.values(), *self._waiting]
            self._waiting.clear()
        for seq in ended:
            seq.request.fail(message)

    def _schedule(self) -> list[Admit]:
        """Waiting requests, first come first served, to the least loaded rank with room for them."""
        admit, prefill = [], [0] * len(self.loads)
        with self._lock:
            while self._waiting:
                seq = self._waiting[0]
                n = len(seq.request.prompt_ids)
                room = [r for r, load in enumerate(self.loads) if load.sequences < self.config.max_batch
                        and load.free_blocks >= seq.blocks and prefill[r] + n <= self.config.max_prefill_tokens]
                if not room:
                    break
                self._waiting.popleft()
                seq.rank = min(room, key=lambda r: (self.loads[r].sequences, -self.loads[r].free_blocks, r))
                self.loads[seq.rank].sequences += 1
                self.loads[seq.rank].free_blocks -= seq.blocks
                prefill[seq.rank] += n
                self._live[seq.seq_id] = seq
                admit.append(Admit(seq_id=seq.seq_id, rank=seq.rank, prompt_ids=seq.request.prompt_ids,
                                   params=seq.params))
        if self.on_admit is not None:
            for a in admit:
                self.on_admit(a)
        return admit

    def _step(self, admit: list[Admit]) -> None:
        start = time.perf_counter()
        step = Step(admit=tuple(admit), retire=self._take_retired(), actions=self._due_actions(),
                    collect=self._collect_due(), bucket=0 if admit else self._bucket(),
                    context=0 if admit or not self.config.decode_graphs else self._context())
        broadcast(step, self.control_group)
        sampled = gather(self.worker.step(step), self.control_group)
        tokens = len(self._live) - len(admit) + sum(len(a.prompt_ids) for a in admit)
        self._window[1] += 1
        self._window[2] += tokens
        if step.collect:
            self._collect()
        for s in sampled:
            self._advance(s)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(time.perf_counter() - start, len(sampled), tokens))

    def _bucket(self) -> int:
        """A decode-only step's shared batch size: the next power of two over the busiest rank's
        sequences (at least `decode_bucket`); 0 where the fixed-capacity path is off."""
        least = self.config.decode_bucket
        busiest = max(load.sequences for load in self.loads)
        return max(least, 1 << (busiest - 1).bit_length()) if least else 0

    def _context(self) -> int:
        """A graphed decode step's shared context width: the longest sequence's context (prompt and
        tokens fed so far, this step's included), rounded up as the caches round it."""
        longest = max(len(s.request.prompt_ids) + s.generated for s in self._live.values())
        bucket = self.worker.cache.context_bucket
        return -(-longest // bucket) * bucket

    def _tick(self) -> bool:
        """No sequence to step: still hand retirements, reshard actions (layer swaps) and a due collect
        of the expert statistics to every rank. False when there was nothing to hand."""
        tick = Tick(retire=self._take_retired(), actions=self._due_actions(), collect=self._collect_due())
        if not (tick.retire or tick.actions or tick.collect):
            return False
        broadcast(tick, self.control_group)
        self.worker.tick(tick)
        if tick.collect:
            self._collect()
        return True

    def _due_actions(self) -> tuple:
        return tuple(self.resharder.due_actions()) if self.resharder else ()

    def _take_retired(self) -> tuple[int, ...]:
        retired, self._retire = tuple(self._retire), []
        return retired

    def _advance(self, sampled: Sampled) -> None:
        """Hand a sampled token to its request; end the sequence on a stop token or at max_tokens."""
        seq = self._live[sampled.seq_id]
        params = seq.request.params
        if sampled.token == self.eos_id or sampled.token in params.stop_token_ids:
            return self._end(seq, FinishReason.STOP)
        seq.generated += 1
        seq.request.emit(sampled.token)
        if seq.generated >= params.max_tokens:
            self._end(seq, FinishReason.LENGTH)

    def _end(self, seq: _Sequence, reason: FinishReason) -> None:
        seq.request.finish(reason)
        del self._live[seq.seq_id]
        self.loads[seq.rank].sequences -= 1
        self.loads[seq.rank].free_blocks += seq.blocks
        self._retire.append(seq.seq_id)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave before the step: their cache blocks go to waiting ones."""
        for seq in [s for s in self._live.values() if s.request.cancelled]:
            self._end(seq, FinishReason.CANCELLED)
        with self._lock:
            cancelled = [s for s in self._waiting if s.request.cancelled]
            self._waiting = deque(s for s in self._waiting if not s.request.cancelled)
        for seq in cancelled:
            seq.request.finish(FinishReason.CANCELLED)

    def _collect_due(self) -> bool:
        start, steps, _ = self._window
        return bool(self._flushes) or (steps > 0 and time.time() - start >= self.stats_interval)

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
        while self._flushes:
            flushes.append(self._flushes.popleft())
        return flushes
