"""What `solve` takes and gives: `Method`, `SolveOptions`, `LayerReport`, `SolveResult`.

A module of their own because both the whole-model solve (`moeplace.placer.solve`) and the per-layer
work in worker processes (`moeplace.placer.solve_layer`) use them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch


class Method(str, enum.Enum):
    cpsat = "cpsat"
    greedy = "greedy"
    eplb = "eplb"
    eplb_global = "eplb-global"


@dataclass(frozen=True)
class SolveOptions:
    method: Method = Method.cpsat
    time_limit: float = 20.0  # wall-clock seconds for the whole solve, all layers
    traffic_weight: float = 0.05  # imbalance traded for all routed tokens leaving their group's node
    move_weight: float = 0.05  # imbalance traded for moving every expert of a layer (with `old`)
    dispatch: Dispatch = Dispatch.equal  # the engine's rule for splitting an expert over its replicas
    seed: int = 0
    workers: int = 0  # processes; 0 = one per CPU core
    max_workloads: int = 32


@dataclass(frozen=True, kw_only=True)
class LayerReport:
    layer: int
    hottest: float  # worst workload's max GPU load / mean, under the solve's dispatch rule
    off_home: float  # share of routed tokens whose expert is off its group's home node (0: no groups)
    moved: int  # (expert, GPU) pairs new relative to `old`
    objective: float
    greedy_hottest: float  # the greedy warm start's, equal split
    bound: float  # lower bound on `hottest` for any placement with these slots
    status: str  # optimal | improved | greedy | eplb | kept (the old layout) | path (searched from it)
    seconds: float
    remote_nodes: float = float("nan")  # expected distinct remote nodes per token, planning workloads

    @property
    def gap(self) -> float:
        return self.hottest / self.bound - 1.0


@dataclass(frozen=True)
class SolveResult:
    placement: Placement
    reports: tuple[LayerReport, ...]
    workloads: tuple[str, ...]
    seconds: float
