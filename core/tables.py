"""Rich tables the CLI prints: solver reports and placement scores."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from moeplace.placer.evaluate import MoveReport, TraceScore
from moeplace.placer.solve import SolveResult


def solve_table(result: SolveResult, per_layer: bool) -> Table:
    """Per-layer (or summary) table of a solve: worst-workload hottest GPU vs greedy, bound and gap."""
    reports = result.reports
    table = Table(title=f"moeplace solve: {len(reports)} layers, {len(result.workloads)} workloads, "
                        f"{result.seconds:.1f} s", title_justify="left")
    for name in ("layer", "hottest", "greedy", "bound", "gap", "off-home", "moved", "status"):
        table.add_column(name, justify="right")
    rows = reports if per_layer else ()
    for r in rows:
        table.add_row(str(r.layer), f"{r.hottest:.4f}", f"{r.greedy_hottest:.4f}", f"{r.bound:.4f}",
                      f"{r.gap:.2%}", f"{r.off_home:.3f}", str(r.moved), r.status)
    if per_layer:
        table.add_section()
    statuses = sorted({r.status for r in reports})
    table.add_row(
        "mean",
        f"{np.mean([r.hottest for r in reports]):.4f}",
        f"{np.mean([r.greedy_hottest for r in reports]):.4f}",
        f"{np.mean([r.bound for r in reports]):.4f}",
        f"{np.mean([r.gap for r in reports]):.2%}",
        f"{np.mean([r.off_home for r in reports]):.3f}",
        str(sum(r.moved for r in reports)),
        "/".join(f"{s}:{sum(r.status == s for r in reports)}" for s in statuses),
    )
    table.add_row("worst", f"{max(r.hottest for r in reports):.4f}",
                  f"{max(r.greedy_hottest for r in reports):.4f}", "", f"{max(r.gap for r in reports):.2%}")
    table.caption = ("hottest = max GPU load / mean over the worst planning workload, equal split; "
                     "bound = lower bound for any placement; off-home = routed share off its group's node")
    return table


def score_table(scores: list[TraceScore], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("trace", "imbalance mean", "worst layer", "balancedness", "best split", "worst window",
                 "nodes/token", "group span"):
        table.add_column(name, justify="right" if name != "trace" else "left")
    for s in scores:
        table.add_row(
            s.name.rsplit("/", 1)[-1],
            f"{s.imbalance_equal_L.mean():.4f}",
            f"{s.imbalance_equal_L.max():.4f}",
            f"{(1 / s.imbalance_equal_L).mean():.4f}",
            f"{s.imbalance_best_L.mean():.4f}",
            "-" if s.worst_window_L is None else f"{s.worst_window_L.mean():.4f}",
            "-" if s.distinct_nodes_L is None else f"{s.distinct_nodes_L.mean():.2f}",
            "-" if s.group_span_L is None else f"{s.group_span_L.mean():.2f}",
        )
    table.caption = "imbalance = max / mean GPU load per layer (equal split across replicas unless 'best split')"
    return table


def moves_line(report: MoveReport) -> str:
    return (f"experts to move: {report.experts} ({report.bytes / 1e9:.2f} GB), "
            f"{int(report.intra_node_L.sum())} of them from a copy on the same node")
