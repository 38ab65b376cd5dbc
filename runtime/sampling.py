"""`SamplingParams` (what a request asks of the sampler) and `sample`, the one sampling function.

Greedy (argmax) at temperature 0; otherwise softmax(logits / temperature) cut to the smallest set of
most likely tokens whose probability reaches `top_p` (nucleus sampling), drawn with the request's own
`torch.Generator`, so a seeded request draws the same tokens whatever it is batched with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 64
MAX_STOP_TOKEN_IDS = 64
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 0..2**63-1


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """max_tokens: tokens to generate at most (>= 1; the engine may cap it lower).
    temperature: 0 = greedy; top_p in (0, 1]: 1 = the whole distribution.
    seed: None = a fresh seed per request. stop: strings that end the text (matched on the decoded text
    by the server, not included). stop_token_ids: ids that end generation (besides EOS, not included)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        self._check_stops()

    def _check_stops(self) -> None:
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} strings, got {self.stop!r}"[:200])
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} characters, got {s!r}"[:200])
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or len(ids) > MAX_STOP_TOKEN_IDS or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} ids >= 0, got {ids!r}"[:200])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """The request's own random stream (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else time.time_ns() % SEED_LIMIT
        return torch.Generator().manual_seed(seed)


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits_V [V] (any float dtype, any device); `generator` from params.generator()."""
    if params.greedy:
        return int(torch.argmax(logits_V))
    # Shift by the max before dividing: logits / a tiny temperature overflow to inf, softmax to NaN.
    logits_V = logits_V.detach().double().cpu()
    probs_V = torch.softmax((logits_V - logits_V.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        probs_V = _nucleus(probs_V, params.top_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def _nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs_V with every token outside the top-p nucleus set to 0 (the most likely token always stays)."""
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    before_V = torch.cumsum(sorted_V, 0) - sorted_V  # probability of the more likely tokens
    sorted_V[before_V >= top_p] = 0
    return torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
