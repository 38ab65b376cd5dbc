"""Leave-one-workload-out scoring: plan on every trace but one, score on the one left out.

This is how a placement's robustness to workload shift is measured (benchmarks/solver.py): a
deployment is planned on the traffic seen so far and must hold on traffic it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.placer.dispatch import Dispatch, dispatch_model
from moeplace.placer.evaluate import best_split, gpu_load_LG, group_span, imbalance
from moeplace.placer.solve import SolveOptions, solve
from moeplace.placer.traffic import remote_nodes_L, token_sample
from moeplace.topology import Topology
from moeplace.trace import Trace


@dataclass(frozen=True)
class HeldOut:
    """One fold: the placement planned without `name`, scored on it (arrays per layer [L])."""

    name: str
    imbalance_L: np.ndarray  # under the scoring dispatch rule
    imbalance_best_L: np.ndarray
    planning_hottest_L: np.ndarray  # worst planning workload, equal split (what the solver minimised)
    greedy_hottest_L: np.ndarray  # the same for the greedy warm start (nan for eplb)
    duplicates: int
    seconds: float
    group_span_L: np.ndarray | None = None  # nodes a routing group spans (traces with n_group > 1)
    remote_nodes_L: np.ndarray | None = None  # expected distinct remote nodes per token (placer.traffic)


@dataclass(frozen=True)
class CrossValidation:
    folds: tuple[HeldOut, ...]

    def mean_imbalance(self) -> float:
        """Mean over folds of the mean-over-layers held-out imbalance (equal split)."""
        return float(np.mean([f.imbalance_L.mean() for f in self.folds]))

    def worst_layer_imbalance(self) -> float:
        """Mean over folds of the worst layer's held-out imbalance (equal split)."""
        return float(np.mean([f.imbalance_L.max() for f in self.folds]))

    def mean_best_split(self) -> float:
        return float(np.mean([f.imbalance_best_L.mean() for f in self.folds]))

    def worst_best_split(self) -> float:
        return float(np.mean([f.imbalance_best_L.max() for f in self.folds]))

    def layers_worse_than_greedy(self, tolerance: float = 1e-9) -> int:
        """Layers (over all folds) where the plan's worst planning workload is hotter than greedy's."""
        return int(sum((f.planning_hottest_L > f.greedy_hottest_L + tolerance).sum() for f in self.folds))

    def mean_group_span(self) -> float:
        spans = [f.group_span_L.mean() for f in self.folds if f.group_span_L is not None]
        return float(np.mean(spans)) if spans else float("nan")

    def mean_remote_nodes(self) -> float:
        return float(np.mean([f.remote_nodes_L.mean() for f in self.folds if f.remote_nodes_L is not None]))

    def mean_seconds(self) -> float:
        return float(np.mean([f.seconds for f in self.folds]))


def leave_one_out(traces: list[Trace], topology: Topology, options: SolveOptions,
                  score_dispatch: Dispatch | None = None, with_best_split: bool = True) -> CrossValidation:
    """Needs at least two traces; each fold plans on all traces but one (for `options.dispatch`) and
    scores on the held-out one under `score_dispatch` (default: the rule it was planned for).
    with_best_split=False skips the per-layer LP (imbalance_best_L is then NaN)."""
    if len(traces) < 2:
        raise ValueError("leave-one-out needs at least two traces")
    folds = []
    for k, held in enumerate(traces):
        plan = [t for i, t in enumerate(traces) if i != k]
        result = solve(plan, topology, options)
        placement = result.placement
        total_LE = held.counts_WLE.sum(axis=0)
        planning = np.max([imbalance(gpu_load_LG(placement, t.counts_WLE.sum(0))) for t in plan], axis=0)
        model = dispatch_model(placement, score_dispatch or options.dispatch)
        tokens = token_sample(held, np.arange(held.num_layers))
        folds.append(
            HeldOut(
                name=held.source.rsplit("/", 1)[-1],
                imbalance_L=imbalance(gpu_load_LG(placement, total_LE, model.shares_LP)),
                imbalance_best_L=(best_split(placement, total_LE)[0] if with_best_split
                                  else np.full(placement.num_layers, np.nan)),
                planning_hottest_L=planning,
                greedy_hottest_L=np.array([r.greedy_hottest for r in result.reports]),
                duplicates=placement.duplicate_replicas(),
                seconds=result.seconds,
                group_span_L=group_span(placement, total_LE, held.n_group) if held.n_group > 1 else None,
                remote_nodes_L=remote_nodes_L(placement, tokens.topk_ids_TLK, model.shares_LP, model.choice_GLE),
            )
        )
    return CrossValidation(tuple(folds))
