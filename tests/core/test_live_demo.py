"""The default `moeplace demo` (core/live_demo.py): its table and summary, and one whole run at small
durations (4 ranks on gloo, live reshard under load)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from moeplace.live_demo import TOPOLOGY, Measured, results_table, run_live_demo, summary_lines
from moeplace.reshard_job import JobState, JobStatus
from moeplace.placement import trivial_placement
from moeplace.placer.evaluate import distinct_nodes, evaluate
from moeplace.trace import Trace


def rendered(renderable) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_measured_agrees_with_the_evaluation():
    rng = np.random.default_rng(0)
    trace = Trace(rng.integers(0, 50, (2, 3, 64)).astype(float), np.array([1, 2, 3]), 8, n_group=8, topk_group=4,
                  topk_ids_TLK=rng.integers(0, 64, (20, 3, 8)))
    placement = trivial_placement(64, TOPOLOGY, trace.layers)
    measured, score = Measured.of(placement, trace), evaluate(placement, trace)
    np.testing.assert_allclose(measured.imbalance_L, score.imbalance_L)
    np.testing.assert_allclose(measured.group_span_L, score.group_span_L)
    np.testing.assert_allclose(measured.distinct_nodes_L, distinct_nodes(placement, trace.topk_ids_TLK))


def test_every_row_says_which_way_is_better():
    before = Measured(np.array([1.5, 1.2]), np.array([1.0, 1.0]), np.array([1.8, 1.9]))
    after = Measured(np.array([1.1, 1.05]), np.array([2.0, 2.0]), None)
    text = rendered(results_table(np.array([1, 2]), before, after))
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 4  # two layers, the mean, the group span; no token row without samples on both sides
    assert all("lower" in row for row in rows)
    assert "1.500" in text and "1.100" in text and "1.350" in text and "1.075" in text


def test_summary_names_each_number_and_ends_with_a_next_command():
    status = JobStatus(id="x", layers_total=3, experts_to_move=12, bytes_to_move=3_000_000, state=JobState.DONE,
                       seconds=1.25, experts_moved=12, bytes_moved=3_000_000)
    lines = summary_lines(status, 12, sent=40, failed=0, same=True)
    assert lines[0] == "reshard: done in 1.25 s; 12 experts moved (12 is the fewest this placement needs), 3.0 MB"
    assert lines[1] == "requests during the demo: 40 sent, 0 failed (0 failed is the goal)"
    assert lines[2].endswith("yes")
    assert lines[-1].startswith("next: ") and "moeplace apply" in lines[-1]


@pytest.mark.slow
def test_the_live_demo_runs_end_to_end():
    console = Console(width=160, record=True, file=io.StringIO())
    assert run_live_demo(console, profile_seconds=1.5, solve_seconds=1.0)
    text = console.export_text()
    assert "mean GPU imbalance" in text and "0 failed" in text and "answered identically before and after: yes" in text
