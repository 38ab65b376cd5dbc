"""What every rank runs: its own sequences (data-parallel attention), stepped as rank 0 says.

`RankWorker` holds this rank's sequences and their latent KV cache. Each `Step` from rank 0 retires
and admits sequences, runs one model step of those it owns (prefill of the new ones, one decode
token for the others; none at all on an idle rank, which still meets the MoE collectives) and
samples each sequence's next token with the sequence's own generator. `worker_loop` is ranks
1..P-1's whole life; rank 0's Engine drives its own RankWorker the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeplace.runtime.control import Admit, Sampled, Step, Stop, Tick
from moeplace.runtime.kv_cache import CacheShape, KVCache, block_bytes
from moeplace.runtime.sampling import sample
from moeplace.runtime.step_graphs import DecodeStepGraphs


@dataclass(slots=True)
class EngineConfig:
    """Per rank: at most `max_batch` sequences; `kv_cache_bytes` of latent cache (None: room for
    max_batch sequences of max_prompt_tokens + max_new_tokens) in blocks of `block_size` tokens; at
    most `max_prefill_tokens` prompt tokens admitted in one step. `queue_limit` requests may wait.
    `decode_bucket` > 0: decode-only steps pad every rank's batch to the same power of two (at least
    this) and the MoE layers take the fixed-capacity path (static shapes, no host sync; eager it is
    slower than the variable-size path, so it pays off once the step is replayed from a CUDA graph);
    0: the variable-size path. `decode_graphs` (needs decode_bucket): those steps replay a CUDA graph
    of the whole step per (bucket, context width) (runtime/step_graphs.py; eager on CPU)."""

    max_batch: int = 8
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    queue_limit: int = 64
    kv_cache_bytes: int | None = None
    block_size: int = 16
    max_prefill_tokens: int = 4096
    decode_bucket: int = 0
    decode_graphs: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prompt_tokens", "max_new_tokens", "queue_limit", "block_size",
                     "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_tokens < self.max_prompt_tokens:
            raise ValueError(f"engine: 'max_prefill_tokens' ({self.max_prefill_tokens}) must hold the longest "
                             f"prompt (max_prompt_tokens {self.max_prompt_tokens})")
        if self.decode_graphs and not self.decode_bucket:
            raise ValueError("engine: 'decode_graphs' needs 'decode_bucket' (the graphs' batch sizes)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"engine: 'kv_cache_bytes' must be >= 1, got {self.kv_cache_bytes}")

    def cache_shape(self, model_config, dtype: torch.dtype) -> CacheShape:
        """The same on every rank: each rank's cache, sized by the budget."""
        budget = self.kv_cache_bytes
        if budget is None:
            blocks = -(-(self.max_prompt_tokens + self.max_new_tokens) // self.block_size)
            budget = self.max_batch * blocks * block_bytes(model_config, self.block_size, dtype)
        return CacheShape.for_budget(model_config, budget, self.block_size, dtype)


@dataclass(slots=True)
class _Owned:
    """A sequence this rank serves: its sampling parameters, generator, and the token to feed next
    (None until its prompt was prefilled)."""

    admit: Admit
    generator: torch.Generator | None
    next_token: int | None = None


class RankWorker:
    def __init__(self, model, config: EngineConfig, rank: int, resharder=None) -> None:
        self.model, self.rank, self.resharder = model, rank, resharder
        self.cache = KVCache(config.cache_shape(model.config, model.dtype), model.device, model.dtype)
        self.graphs = DecodeStepGraphs(model, self.cache) if config.decode_graphs else None
        self._owned: dict[int, _Owned] = {}  # admission order

    @property
    def sequences(self) -> int:
        return len(self._owned)

    def step(self, step: Step) -> tuple[Sampled, ...]:
        """Retire, admit, reshard actions, one model step of this rank's sequences; what it sampled."""
        self._retire(step.retire)
        new = [a for a in step.admit if a.rank == self.rank]
        for admit in new:
            self.cache.admit(admit.seq_id, len(admit.prompt_ids) + admit.params.max_tokens)
            self._owned[admit.seq_id] = _Owned(admit, admit.params.generator())
        self.apply(step.actions)
        decode = [seq for seq, owned in self._owned.items() if owned.next_token is not None]
        token_ids = [self._owned[seq].next_token for seq in decode] + [t for a in new for t in a.prompt_ids]
        if step.bucket:
            logits_SV = self._padded_decode(decode, token_ids, step.bucket, step.context or None)
        else:
            plan = self.cache.plan(decode, [(a.seq_id, len(a.prompt_ids)) for a in new])
            logits_SV = self.model.step(self.cache, plan, torch.tensor(token_ids, dtype=torch.int64))
        seqs = decode + [a.seq_id for a in new]
        # Greedy rows in one argmax and one copy to the host: a sync per sequence would cost more than the step.
        greedy_S = logits_SV.argmax(dim=-1).tolist() if seqs else []
        sampled = []
        for i, (seq, greedy) in enumerate(zip(seqs, greedy_S)):
            owned = self._owned[seq]
            params = owned.admit.params
            owned.next_token = greedy if params.greedy else sample(logits_SV[i], params, owned.generator)
            sampled.append(Sampled(seq, owned.next_token))
        return tuple(sampled)

    def _padded_decode(self, decode: list[int], token_ids: list[int], bucket: int, width: int | None) -> torch.Tensor:
        """The decode step at the shared bucket size: padding rows hold token 0 and route to no expert."""
        assert len(decode) <= bucket, (len(decode), bucket)
        plan = self.cache.plan(decode, [], pad_to=bucket, width=width)
        ids_B = torch.tensor(token_ids + [0] * (bucket - len(decode)), dtype=torch.int64, device=self.model.device)
        live_B = (torch.arange(bucket) < len(decode)).to(self.model.device)
        if self.graphs is not None:
            return self.graphs.run(plan, ids_B, live_B)[: len(decode)]
        return self.model.decode_step(self.cache, plan, ids_B, live_B)[: len(decode)]

    def tick(self, tick: Tick) -> None:
        self._retire(tick.retire)
        self.apply(tick.actions)

    def apply(self, actions) -> None:
        """Reshard actions take effect between two steps, on every rank in the same order."""
        if self.resharder is not None:
            self.resharder.raise_if_crashed()
        for action in actions:
            self.resharder.apply(action)

    def _retire(self, seq_ids: tuple[int, ...]) -> None:
        for seq in seq_ids:
            if self._owned.pop(seq, None) is not None:
                self.cache.release(seq)


def worker_loop(model, control_group, config: EngineConfig, resharder=None) -> None:
    """Ranks 1..P-1: follow rank 0's messages until it says Stop."""
    worker = RankWorker(model, config, dist.get_rank(control_group), resharder)
    while True:
        match broadcast(None, control_group):
            case Stop():
                return
            case Step() as step:
                gather(worker.step(step), control_group)
                collect = step.collect
            case Tick() as tick:
                worker.tick(tick)
                collect = tick.collect
        if collect:  # rank 0 collects the expert statistics after this step
            model.collect_stats()


def broadcast(message, group):
    """Rank 0 sends `message` to every rank of the control group; others return what it sent."""
    if group is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(sampled: tuple[Sampled, ...], group) -> list[Sampled]:
    """Every rank's sampled tokens, on rank 0 (rank order); other ranks get []."""
    if group is None:
        return list(sampled)
    rank = dist.get_rank(group)
    boxes = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(sampled, boxes, dst=0, group=group)
    return [s for box in boxes for s in box] if rank == 0 else []
