"""`KVCache`: one rank's MLA cache of the compressed latent, in paged blocks, and the step plans over it.

Legend: L attention layers, N cache rows (num_blocks * block_size), C = kv_lora_rank + qk_rope_head_dim
(the normalised KV latent, then the rotated shared rope key: DeepSeek-V3 512 + 64), B sequences of a
step, X context positions a decoding sequence may attend to (its context, padded to a bucket).

What is cached is the latent, not per-head K/V: 576 values per token and layer instead of
128 heads x (192 + 128) for DeepSeek-V3 (71x less). Decode attention reads it with the absorbed
projections (runtime/mla.py).

Paged blocks rather than per-sequence slabs: a slab must be sized for the longest sequence the
server allows (prompt limit + max_tokens), so short requests would strand most of it and the memory
budget would admit far fewer sequences. A sequence reserves ceil((prompt + max_tokens) / block_size)
blocks when admitted, so it can never run out mid-generation (no preemption, no recompute); the
admission test is simply "enough free blocks". The price is a gather through the block table in
each decode step, done once per step for all layers (`DecodePlan.rows_BX`).

The tensors never move: `latent_LNC` is allocated once, and every step's plan is a set of index
tensors, so a captured decode step stays valid as sequences come and go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplace.runtime.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class CacheShape:
    """How big one rank's cache is: num_layers, num_blocks, block_size tokens per block, width C."""

    num_layers: int
    num_blocks: int
    block_size: int
    width: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"kv cache: '{name}' must be >= 1, got {getattr(self, name)}")

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> CacheShape:
        """As many blocks as `budget_bytes` holds; ValueError when not even one fits."""
        per_block = block_bytes(config, block_size, dtype)
        if budget_bytes < per_block:
            raise ValueError(f"kv cache budget of {budget_bytes} bytes holds no block of {block_size} tokens "
                             f"({per_block} bytes)")
        return cls(num_layers=config.num_hidden_layers, num_blocks=budget_bytes // per_block,
                   block_size=block_size, width=config.kv_lora_rank + config.qk_rope_head_dim)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: block_size tokens' latents in every layer."""
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * block_size * width * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Where a step's new tokens go and what each sequence attends to (device int64 tensors).

    Rows of the step: the decoding sequences' one token each (rows 0..Bd-1, sequence order), then each
    prefilled prompt's tokens in order. write_N [N] cache row of each new token; positions_N [N] its
    position in its sequence. decode: rows_BX [Bd, X] cache rows of each decoding sequence's context
    (padding: other rows, masked out), context_B [Bd] its length (the new token included). prefill:
    lengths (host ints) of the prompts, each starting at position 0. last_S [Bd + Bp] step row of each
    sequence's last token (whose logits sample its next one)."""

    write_N: torch.Tensor
    positions_N: torch.Tensor
    rows_BX: torch.Tensor
    context_B: torch.Tensor
    prefill_lengths: tuple[int, ...]
    last_S: torch.Tensor

    @property
    def num_decode(self) -> int:
        return self.rows_BX.shape[0]


class KVCache:
    """latent_LNC [L, N, C] (model dtype) and the block allocator of one rank.

    A sequence (any hashable id) is `admit`ted with the tokens it may ever hold, `plan` writes its new
    tokens (prompt, then one per decode step) and `release` frees its blocks."""

    def __init__(self, shape: CacheShape, device: torch.device, dtype: torch.dtype, context_bucket: int = 64) -> None:
        self.shape = shape
        # One block past the budget's: the scratch rows that a padded decode batch's padding writes.
        self.latent_LNC = torch.zeros(shape.num_layers, (shape.num_blocks + 1) * shape.block_size, shape.width,
                                      device=device, dtype=dtype)
        self._scratch = shape.num_blocks
        self.context_bucket = context_bucket  # decode context padded to a multiple: few distinct shapes
        self._free = list(range(shape.num_blocks - 1, -1, -1))  # a stack: lowest block first
        self._blocks: dict[object, list[int]] = {}
        self._length: dict[object, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def admit(self, seq, tokens: int) -> None:
        """Reserve room for `tokens` tokens of a new sequence (assert: the scheduler checked it fits)."""
        need = self.shape.blocks_for(tokens)
        assert seq not in self._blocks, f"sequence {seq} is already admitted"
        assert need <= len(self._free), f"sequence {seq} needs {need} blocks, {len(self._free)} are free"
        self._blocks[seq] = [self._free.pop() for _ in range(need)]
        self._length[seq] = 0

    def release(self, seq) -> None:
        self._free.extend(reversed(self._blocks.pop(seq)))
        del self._length[seq]

    def assume_written(self, seq, length: int) -> None:
        """Treat the first `length` positions of an admitted, empty sequence as written, whatever its rows
        hold: benchmarks time decode at a long context without prefilling it."""
        assert self._length[seq] == 0 and self.shape.blocks_for(length) <= len(self._blocks[seq]), (seq, length)
        self._length[seq] = length

    def length(self, seq) -> int:
        return self._length[seq]

    def plan(self, decode: list, prefill: list[tuple[object, int]], pad_to: int | None = None,
             width: int | None = None) -> StepPlan:
        """The plan of a step that adds one token to each sequence of `decode` and a whole prompt of
        (sequence, length) to each of `prefill` (admitted, still empty). Advances their lengths.
        pad_to (decode only): that many decode rows, the ones past `decode` padding that writes the
        scratch block and attends to it alone (context 1), so every rank can share one batch shape;
        width: the decode context X (at least the longest context), so every rank can share that too.
        Built from the block tables with tensor ops (a per-position Python loop would cost more than
        the step at a few hundred sequences), on the host, then moved to the device at once."""
        bs = self.shape.block_size
        pad = 0 if pad_to is None else pad_to - len(decode)
        assert pad >= 0 and not (pad and prefill), (pad_to, len(decode), len(prefill))
        write = [self._row(seq, self._length[seq]) for seq in decode] + [self._scratch * bs] * pad
        positions = [self._length[seq] for seq in decode] + [0] * pad
        context = [n + 1 for n in positions]
        for seq in decode:
            self._length[seq] += 1
        write_N, positions_N = [torch.tensor(write, dtype=torch.int64)], [torch.tensor(positions, dtype=torch.int64)]
        for seq, n in prefill:
            assert self._length[seq] == 0, f"sequence {seq} is prefilled twice"
            p_T = torch.arange(n)
            write_N.append(torch.tensor(self._blocks[seq])[p_T // bs] * bs + p_T % bs)
            positions_N.append(p_T)
            self._length[seq] = n
        X = -(-max(context, default=0) // self.context_bucket) * self.context_bucket
        assert width is None or width >= X, (width, X)
        X = width or X
        M = -(-X // bs)
        tables = [(self._blocks[seq] + [0] * M)[:M] for seq in decode] + [[self._scratch] * M] * pad
        x_X = torch.arange(X)
        rows_BX = torch.tensor(tables, dtype=torch.int64).view(len(tables), M)[:, x_X // bs] * bs + x_X % bs
        B = len(tables)
        ends = torch.tensor([n for _, n in prefill], dtype=torch.int64).cumsum(0) + B - 1
        device = self.latent_LNC.device
        return StepPlan(write_N=torch.cat(write_N).to(device), positions_N=torch.cat(positions_N).to(device),
                        rows_BX=rows_BX.to(device), context_B=torch.tensor(context, dtype=torch.int64).to(device),
                        prefill_lengths=tuple(n for _, n in prefill),
                        last_S=torch.cat([torch.arange(B), ends]).to(device))

    def _row(self, seq, position: int) -> int:
        block = self._blocks[seq][position // self.shape.block_size]
        return block * self.shape.block_size + position % self.shape.block_size
