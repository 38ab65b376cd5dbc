"""core/tables.py: what `solve` and `evaluate` print (real solves and scores on small traces)."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from moeplace.placement import trivial_placement
from moeplace.placer.evaluate import evaluate, moves
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.tables import moves_line, score_table, solve_table
from moeplace.topology import Topology
from moeplace.trace import Trace

TOPO = Topology(num_gpus=4, gpus_per_node=2, slots_per_gpu=5)
TRACE = Trace(np.random.default_rng(0).lognormal(0, 1, (2, 3, 16)) * 100, np.array([3, 4, 5]), 4, n_group=4,
              topk_group=2, source="/data/a_rather_long_trace_name_prefill_in1000out1000.safetensors")


def text(table, width: int = 200) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_solve_table_of_eplb_shows_dashes_not_nan():
    out = text(solve_table(solve([TRACE], TOPO, SolveOptions(method=Method.eplb, workers=1)), per_layer=True))
    assert "nan" not in out.lower() and "eplb:3" in out and " - " in out


def test_solve_table_of_a_search_reports_every_layer_and_the_mean():
    result = solve([TRACE], TOPO, SolveOptions(method=Method.greedy, time_limit=1, workers=1))
    out = text(solve_table(result, per_layer=True))
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert rows == ["3", "4", "5", "mean", "worst"]
    assert f"{np.mean([r.hottest for r in result.reports]):.4f}" in out


def test_score_table_keeps_whole_names_in_80_columns_and_leaves_out_empty_columns():
    placement = trivial_placement(16, TOPO, TRACE.layers)
    out = text(score_table([evaluate(placement, TRACE)], "title"), width=80)
    assert "a_rather_long_trace_name_prefill_in1000out1000.safetensors" in out.replace("\n", "")
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "#1  a_rather_long" in out  # too long for the column: numbered, listed below
    assert "window" in out.split("imbalance =")[0]  # two windows: the worst window's column is shown
    one_window = Trace(TRACE.counts_WLE[:1], TRACE.layers, 4, source="/data/one.safetensors")
    out = text(score_table([evaluate(placement, one_window)], "t"), width=80)
    assert "window" not in out.split("imbalance =")[0] and "one.safetensors" in out and "#1" not in out


def test_moves_line_names_count_size_and_same_node_copies():
    old = trivial_placement(16, TOPO, TRACE.layers)
    new = solve([TRACE], TOPO, SolveOptions(method=Method.greedy, workers=1)).placement
    report = moves(old, new)
    line = moves_line(report)
    assert line.startswith(f"experts to move: {report.experts} (")
    assert f"{int(report.intra_node_L.sum())} of them from a copy on the same node" in line
