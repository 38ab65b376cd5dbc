"""`DecodeGraphs`: a decode step captured in a CUDA graph once per batch-size bucket, then replayed.

The step is any function `step(x_CD, live_C)` returning a tensor or a tuple of tensors of C rows
(e.g. the output and top-k ids of the MoE layers' `EPMoE.forward_decode`, one after the other), with
static shapes and no host sync. A collective: every rank runs the same bucket
in the same order, so the caller picks the bucket from the largest batch of the group (the engine's
lockstep step message carries it) with `bucket_for`.

Capture (per bucket, the first time it is used): two eager warm-up runs on a side stream with no live
token (Triton compiles, NCCL connects, the allocator sizes its pool, and the recorder counts nothing),
then the capture itself, which runs nothing. Replay: the batch is copied into the bucket's static input
(padding rows zero, live false), the graph replays, the first T rows of its static output are returned
(a view the next replay overwrites). Tensors the step reads (weights, routing tables) must be updated in
place (`EPMoE.use_layout`, slot `copy_`) to stay valid; `drop` forgets the graphs when they cannot be.
On CPU (no graphs) the same interface runs the step eagerly on the padded batch: one code path to test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Rows = torch.Tensor | tuple[torch.Tensor, ...]
Step = Callable[[torch.Tensor, torch.Tensor], Rows]


@dataclass
class _Bucket:
    x_CD: torch.Tensor
    live_C: torch.Tensor
    out: Rows | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """buckets: ascending capacities (tokens per rank); hidden, dtype, device: the step's input."""

    def __init__(self, step: Step, buckets: list[int], hidden: int, dtype: torch.dtype, device: torch.device,
                 use_graphs: bool | None = None):
        if not buckets or sorted(set(buckets)) != list(buckets) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct positive sizes, got {buckets}")
        self.step, self.buckets, self.hidden, self.dtype = step, list(buckets), hidden, dtype
        self.device = torch.device(device)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._by_size: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds: dict[int, float] = {}  # how long each bucket's warm-up and capture took

    def bucket_for(self, max_tokens: int) -> int:
        """Smallest bucket holding `max_tokens` (the group's largest batch); ValueError above the largest."""
        for size in self.buckets:
            if size >= max_tokens:
                return size
        raise ValueError(f"decode batch of {max_tokens} tokens exceeds the largest graph bucket "
                         f"({self.buckets[-1]}): run it on the variable-size path")

    def run(self, x_TD: torch.Tensor, bucket: int) -> Rows:
        """The step's output rows of x_TD [T, D] (T <= bucket; T may be 0), through bucket `bucket`."""
        assert bucket in self.buckets, f"{bucket} is not one of the buckets {self.buckets}"
        T = x_TD.shape[0]
        if T > bucket:
            raise ValueError(f"decode batch of {T} tokens exceeds the step's bucket of {bucket}")
        b = self._by_size.get(bucket) or self._capture(bucket)
        b.x_CD[:T].copy_(x_TD)
        b.x_CD[T:].zero_()
        b.live_C.copy_(torch.arange(bucket, device=self.device) < T)
        if b.graph is None:
            return _head(self.step(b.x_CD, b.live_C), T)
        b.graph.replay()
        return _head(b.out, T)

    def drop(self) -> None:
        """Forget every captured graph (the next use of a bucket captures again)."""
        self._by_size.clear()
        # The old graphs' pool goes with them; capturing into its handle again trips the caching
        # allocator (seen on torch 2.11: `use_count > 0` internal assert): a fresh pool.
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _capture(self, bucket: int) -> _Bucket:
        start = time.perf_counter()
        b = _Bucket(torch.zeros(bucket, self.hidden, dtype=self.dtype, device=self.device),
                    torch.zeros(bucket, dtype=torch.bool, device=self.device))
        if self.use_graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # no live token: nothing is counted, every kernel is compiled
                    self.step(b.x_CD, b.live_C)
            torch.cuda.current_stream(self.device).wait_stream(side)
            # Warm-up collectives finished before capture, and other threads' CUDA calls (NCCL's watchdog
            # polls its events) left alone during it: capture errors only for this thread's calls.
            torch.cuda.synchronize(self.device)
            b.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(b.graph, pool=self._pool, capture_error_mode="thread_local"):
                b.out = self.step(b.x_CD, b.live_C)
            torch.cuda.synchronize(self.device)  # capture time is a measured cost: count all of it
        self._by_size[bucket] = b
        self.capture_seconds[bucket] = time.perf_counter() - start
        return b


def _head(out: Rows, T: int) -> Rows:
    return tuple(t[:T] for t in out) if isinstance(out, tuple) else out[:T]
