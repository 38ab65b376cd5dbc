"""Messages between the ranks of a serving deployment: frozen dataclasses, matched with `match`.

Rank 0 (the scheduler) broadcasts one message per loop iteration on the gloo control group:
- `Step`: every rank retires the sequences named, admits those assigned to it, applies the reshard
  actions, runs one model step of its own sequences (maybe none: an idle rank still meets the MoE
  collectives) and sends back what it sampled (`Sampled`, gathered to rank 0); then, when `collect`,
  every rank takes part in the collect of the expert statistics.
- `Tick`: no model step (no sequence anywhere), but retirements, reshard actions or a collect are due.
- `Stop`: the ranks leave their loops.
Reshard actions (`StartReshard`, `SwapLayer`) ride in Step and Tick so they take effect between two
steps, on every rank in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moeplace.placement import Placement
from moeplace.runtime.sampling import SamplingParams

if TYPE_CHECKING:  # the planner (networkx, the placer) is not needed to pass a plan along
    from moeplace.runtime.reshard_plan import ReshardPlan


@dataclass(frozen=True)
class StartReshard:
    """Every rank starts executing `plan` (a ReshardPlan to `new`) in its worker thread, as job `job_id`."""

    job_id: str
    new: Placement
    plan: ReshardPlan


@dataclass(frozen=True)
class SwapLayer:
    """Every rank installs its staged experts of layer row `row` and swaps in its routing row
    phy2log_P [P] int64."""

    row: int
    phy2log_P: np.ndarray


ReshardAction = StartReshard | SwapLayer


@dataclass(frozen=True, kw_only=True)
class Admit:
    """Sequence `seq_id` starts on rank `rank`: its prompt token ids and sampling parameters (seed
    always set, so its draws are the same whichever rank serves it)."""

    seq_id: int
    rank: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, kw_only=True)
class Step:
    """bucket: 0, or (a decode-only step) the batch every rank pads its decode rows to, so the MoE layers
    take the fixed-capacity path with one shape on all ranks; context: 0, or the decode context width
    every rank uses (with bucket, the shape of the step's CUDA graph, captured by all ranks together)."""

    admit: tuple[Admit, ...]
    retire: tuple[int, ...]
    actions: tuple[ReshardAction, ...]
    collect: bool
    bucket: int = 0
    context: int = 0


@dataclass(frozen=True, kw_only=True)
class Tick:
    retire: tuple[int, ...]
    actions: tuple[ReshardAction, ...]
    collect: bool


@dataclass(frozen=True)
class Stop:
    pass


Message = Step | Tick | Stop


@dataclass(frozen=True)
class Sampled:
    """The token a rank sampled for one of its sequences in a step."""

    seq_id: int
    token: int
