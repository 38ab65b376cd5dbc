"""`solve --from OLD`: the old layout is a candidate, so the solve is never worse than not moving
under its own objective, and more move weight never plans more moves."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moeplace.placer.evaluate import gpu_load_LG, imbalance
from moeplace.placer.layer import SCALE
from moeplace.placer.migrate import Candidate, choose
from moeplace.placer.solve import SolveOptions, solve
from moeplace.topology import Topology
from moeplace.trace import Trace

WEIGHTS = [0.0, 0.02, 0.2, 1.0, 100.0]


def traces(seed: int, E: int, L: int = 2) -> list[Trace]:
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0, 1, (L, E))
    return [Trace(base[None] * rng.lognormal(0, 0.3, (2, L, E)) * 1000, np.arange(3, 3 + L), 4,
                  num_model_layers=3 + L, n_group=4, topk_group=2, source=f"w{seed}.{i}") for i in range(2)]


def hottest_L(placement, trs) -> np.ndarray:
    """[L] worst window's max/mean GPU load, equal split (the scorer, not the solver)."""
    return np.max([imbalance(gpu_load_LG(placement, counts)) for t in trs for counts in t.counts_WLE], axis=0)


@pytest.mark.parametrize("E, topo", [(16, Topology(4, 2, 5)), (32, Topology(8, 4, 5))])
@pytest.mark.slow
def test_more_move_weight_never_more_moves(E, topo):
    # A generous limit: the searches end by their patience, so every weight sees the same candidates
    # (CP-SAT on deterministic time), whatever else loads the machine.
    options = SolveOptions(time_limit=60.0, workers=1, traffic_weight=0.0, seed=1)
    old = solve(traces(1, E), topo, options).placement
    new_traces = traces(2, E)
    moved = []
    for weight in WEIGHTS:
        result = solve(new_traces, topo, replace(options, move_weight=weight), old=old)
        moved.append([r.moved for r in result.reports])
        for report, before in zip(result.reports, hottest_L(old, new_traces)):
            # never worse than not moving, under the solve's own objective (0 moves: hottest alone)
            assert report.objective <= before + 2 / SCALE
    per_layer = np.array(moved)
    assert (np.diff(per_layer, axis=0) <= 0).all(), per_layer
    assert per_layer[0].sum() > 0 and per_layer[-1].sum() == 0  # free moves are taken; costly ones not


def test_solving_again_on_the_same_traces_keeps_the_layout():
    """The issue's case: --from a placement solved for these very traces planned thousands of moves."""
    trs, topo = traces(3, 64), Topology(8, 4, 10)
    options = SolveOptions(time_limit=3.0, workers=1, seed=0)
    first = solve(trs, topo, options)
    again = solve(trs, topo, replace(options, seed=5), old=first.placement)
    for a, b in zip(again.reports, first.reports):
        assert a.objective <= b.objective + 2 / SCALE
    assert sum(r.moved for r in again.reports) <= sum(r.moved for r in first.reports) // 4


def test_choose_prefers_fewer_moves_on_ties():
    problem_free = [Candidate(np.zeros((1, 1), dtype=int), base=100_000, moved=0, hottest=100_000, label="kept"),
                    Candidate(np.zeros((1, 1), dtype=int), base=100_000, moved=3, hottest=100_000, label="path")]
    assert choose(problem_free, 0.0, 16).label == "kept"
    cheaper = [problem_free[0], Candidate(np.zeros((1, 1), dtype=int), 90_000, 3, 90_000, "fresh")]
    assert choose(cheaper, 0.0, 16).label == "fresh"
    assert choose(cheaper, 1.0, 16).label == "kept"  # 0.1 better, 3/16 worse
