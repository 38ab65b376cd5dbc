"""Faults a test injects into live reshards: a `FaultPlan` handed to the `Resharder` by the test's
own launcher (tests/support/faulty_rank.py); production passes none, and `NO_FAULTS` does nothing.

Spec (one fault per job, in submission order, comma-separated; "-" = no fault for that job):
  corrupt:LAYER        a byte of every expert received in LAYER flips after the transfer
  fail:LAYER:RANK      RANK raises while staging LAYER
  stall:LAYER:RANK     RANK posts its transfers of LAYER 2 x timeout late (its peers' waits time out)
  slow:LAYER           every rank waits a second before posting LAYER (a job that surely runs a while)
  crash:LAYER:RANK     RANK's reshard thread raises outside any step the agreement covers (a bug): the
                       server must exit, not serve on with a job that never ends
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import torch

from moeplace.runtime.slots import SlotWeights


class FaultKind(str, Enum):
    CORRUPT = "corrupt"
    FAIL = "fail"
    STALL = "stall"
    SLOW = "slow"
    CRASH = "crash"


@dataclass(frozen=True)
class Fault:
    """One job's fault: `kind` at model layer `layer`, on `rank` (None: every rank that receives)."""

    kind: FaultKind
    layer: int
    rank: int | None = None

    def before_stage(self, layer: int, rank: int) -> None:
        if self.kind is FaultKind.FAIL and (layer, rank) == (self.layer, self.rank):
            raise RuntimeError(f"injected failure on rank {rank}")

    def before_post(self, layer: int, rank: int, timeout_s: float) -> None:
        if self.kind is FaultKind.STALL and (layer, rank) == (self.layer, self.rank):
            time.sleep(2 * timeout_s)
        if self.kind is FaultKind.SLOW and layer == self.layer:
            time.sleep(1.0)
        if self.kind is FaultKind.CRASH and (layer, rank) == (self.layer, self.rank):
            raise RuntimeError(f"injected crash of rank {rank}'s reshard thread")

    def after_receive(self, layer: int, received: SlotWeights) -> None:
        """Flip a byte in the middle of each received expert's weights, as a faulty wire would."""
        if self.kind is FaultKind.CORRUPT and layer == self.layer:
            rows = received.w13.reshape(received.w13.shape[0], -1).view(torch.uint8)
            rows[:, rows.shape[1] // 2] ^= 0x5A


@dataclass(frozen=True)
class NoFault:
    """Production: every hook does nothing."""

    def before_stage(self, layer: int, rank: int) -> None:
        pass

    def before_post(self, layer: int, rank: int, timeout_s: float) -> None:
        pass

    def after_receive(self, layer: int, received: SlotWeights) -> None:
        pass


NO_FAULTS = NoFault()


@dataclass(frozen=True)
class FaultPlan:
    """faults[i]: the fault of the i-th job a server runs (NO_FAULTS past the end)."""

    faults: tuple[Fault | NoFault, ...] = ()

    def for_job(self, index: int) -> Fault | NoFault:
        return self.faults[index] if index < len(self.faults) else NO_FAULTS

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """From the spec above; ValueError naming the bad entry."""
        faults = []
        for entry in filter(None, spec.split(",")):
            if entry == "-":
                faults.append(NO_FAULTS)
                continue
            kind, *numbers = entry.split(":")
            try:
                fault = Fault(FaultKind(kind), *map(int, numbers))
            except (ValueError, TypeError):
                raise ValueError(f"fault {entry!r}: expected corrupt:LAYER, slow:LAYER, fail:LAYER:RANK, "
                                 "stall:LAYER:RANK or crash:LAYER:RANK")
            if (fault.rank is None) != (fault.kind in (FaultKind.CORRUPT, FaultKind.SLOW)):
                raise ValueError(f"fault {entry!r}: corrupt and slow take a layer; fail, stall and crash a "
                                 "layer and a rank")
            faults.append(fault)
        return cls(tuple(faults))
