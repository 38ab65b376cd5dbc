"""The whole decode step (embedding, every layer's MLA attention over the KV cache and its MoE layer on
the fixed-capacity path, final norm, head) captured in a CUDA graph per shape and replayed.

Legend: B decode rows (the batch bucket every rank shares), X context width (the shared context
bucket), V vocabulary, L MoE layers, K top-k.

A shape is (B, X); the engine agrees both across the ranks each step (runtime/engine.py), so every rank
captures a new shape in the same step: the capture's warm-up runs the collectives eagerly, on all ranks
together. Inputs live in static tensors the graph captured (token ids, the plan's index tensors, the
live mask) and are copied in before each replay; the KV cache, the weights, the routing tables and the
recorder's window counters are the model's own tensors, updated in place (a reshard swaps layers with
`EPMoE.use_layout` and in-place weight copies, so graphs stay valid). The recorder's per-token samples
are drawn from the replayed step's selections outside the graph (their boolean indexing syncs).
On CPU (`use_graphs` False) the same static-tensor path runs eagerly: the tests' check of the bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moeplace.runtime.forward import Forward, cached_step
from moeplace.runtime.kv_cache import KVCache, StepPlan


@dataclass
class _Shape:
    """One captured shape: its static inputs (a StepPlan of static tensors, ids_B, live_B), its graph
    and outputs (None until captured, or always on CPU)."""

    plan: StepPlan
    ids_B: torch.Tensor
    live_B: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    out: Forward | None = None


class DecodeStepGraphs:
    def __init__(self, model, cache: KVCache, use_graphs: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds: dict[tuple[int, int], float] = {}

    def run(self, plan: StepPlan, ids_B: torch.Tensor, live_B: torch.Tensor) -> torch.Tensor:
        """logits_BV float32 of a padded decode-only plan (B rows, X context), as `EPModel.decode_step`."""
        assert not plan.prefill_lengths, "decode graphs take decode-only plans"
        key = tuple(plan.rows_BX.shape)
        shape = self._shapes.get(key) or self._capture(plan)
        for name in ("write_N", "positions_N", "rows_BX", "context_B", "last_S"):
            getattr(shape.plan, name).copy_(getattr(plan, name))
        shape.ids_B.copy_(ids_B)
        shape.live_B.copy_(live_B)
        if shape.graph is None:
            out = self._step(shape)
        else:
            shape.graph.replay()
            out = shape.out
        if self.model.sample_rate > 0:  # boolean indexing syncs: outside the graph
            self.model.record_samples([ids_BK[live_B] for ids_BK in out.ids_L])
        return out.logits.clone()  # the next replay overwrites the static output

    def _step(self, shape: _Shape) -> Forward:
        with torch.no_grad():
            return cached_step(self.model.hf_model, self.cache, shape.plan, shape.ids_B, shape.live_B)

    def _capture(self, plan: StepPlan) -> _Shape:
        start = time.perf_counter()
        device = self.model.device
        static = StepPlan(**{name: getattr(plan, name).clone() for name in
                             ("write_N", "positions_N", "rows_BX", "context_B", "last_S")}, prefill_lengths=())
        B = plan.rows_BX.shape[0]
        shape = _Shape(static, torch.zeros(B, dtype=torch.int64, device=device),
                       torch.zeros(B, dtype=torch.bool, device=device))
        if self.use_graphs:
            # Warm-up with no live row: nothing routed or counted, every kernel compiled, the collectives
            # run eagerly on every rank together; the cache rows it writes are written again by the replay.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(shape)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            shape.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(shape.graph, pool=self._pool, capture_error_mode="thread_local"):
                shape.out = self._step(shape)
        self._shapes[tuple(plan.rows_BX.shape)] = shape
        self.capture_seconds[tuple(plan.rows_BX.shape)] = time.perf_counter() - start
        return shape
