"""Migration-aware choice of a layer's layout (`solve --from OLD`): never worse than not moving, and
monotone in the move weight.

Candidates, all computed WITHOUT the move weight mu:
- the old layout itself (0 moves);
- every layout the search passes through when it starts from the old layout (old replica counts,
  swaps and CP-SAT neighbourhoods that lower hottest + traffic): a path of ever more moves;
- the fresh plan (new replica counts), searched without a move cost.
The chosen one minimises  base + mu * moved / E  (base = hottest GPU + traffic term), fewest moves
on ties. Because the candidate set does not depend on mu, more weight never picks more moves: for
mu1 < mu2 with choices k1, k2, adding the two optimality inequalities gives
(mu2 - mu1) * (moved_k2 - moved_k1) <= 0. And the old layout is a candidate, so the objective is
never worse than not moving.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeplace.placer.cpsat import improve_layer
from moeplace.placer.layer import SCALE, LayerProblem, Packing


@dataclass(frozen=True)
class Candidate:
    """gpu_experts_GS [G, S]; base = hottest + traffic (integer units of 1/SCALE); moved (expert, GPU)
    pairs new relative to the old layout; hottest alone (integer units)."""

    gpu_experts_GS: np.ndarray
    base: int
    moved: int
    hottest: int
    label: str  # "kept" | "path" | "fresh"


def snapshot(packing: Packing, label: str) -> Candidate:
    return Candidate(packing.gpu_experts.copy(), packing.hottest() + packing.traffic(), packing.moved(),
                     packing.hottest(), label)


def path_from_old(problem: LayerProblem, old_GS: np.ndarray, deadline: float, rng: np.random.Generator) -> list[Candidate]:
    """The old layout and the layouts the search visits from it (its own replica counts). An old layout
    with two copies of an expert on one GPU (EPLB's) cannot be searched from: only it is returned."""
    replicas_E = np.bincount(old_GS.ravel(), minlength=problem.num_experts)
    old_problem = replace(problem, replicas_E=replicas_E, move_weight=0.0)
    if any(len(np.unique(row)) < len(row) for row in old_GS) or replicas_E.max() > problem.num_gpus:
        return [_scored_rows(old_problem, old_GS)]
    packing = Packing(old_problem, old_GS)
    path = [snapshot(packing, "kept")]
    improve_layer(packing, deadline, rng, on_change=lambda p: path.append(snapshot(p, "path")))
    return path


def _scored_rows(problem: LayerProblem, rows_GS: np.ndarray) -> Candidate:
    """A layout the Packing cannot hold (duplicates on a GPU), scored the same way: equal split."""
    load_WE = np.rint(problem.share_WE * problem.num_gpus / np.maximum(problem.replicas_E, 1) * SCALE)
    hottest = int(load_WE[:, rows_GS].sum(axis=2).max())
    traffic = 0
    if problem.home_node_E is not None:
        node_G = np.arange(problem.num_gpus) // problem.gpus_per_node
        home = np.zeros(problem.num_experts, dtype=bool)
        for g, row in enumerate(rows_GS):
            home[row[problem.home_node_E[row] == node_G[g]]] = True
        traffic = int(problem.traffic_weight_E()[~home].sum())
    return Candidate(rows_GS.copy(), hottest + traffic, 0, hottest, "kept")


def choose(candidates: list[Candidate], move_weight: float, num_experts: int) -> Candidate:
    """argmin base / SCALE + move_weight * moved / E, fewest moves on ties."""
    return min(candidates, key=lambda c: (c.base / SCALE + move_weight * c.moved / num_experts, c.moved))
