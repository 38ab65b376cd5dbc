"""Rich tables the CLI prints: solver reports and placement scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from moeplace.placer.evaluate import MoveReport, TraceScore
from moeplace.placer.solve_types import SolveResult


def solve_table(result: SolveResult, per_layer: bool) -> Table:
    """Per-layer (or summary) table of a solve: worst-workload hottest GPU vs greedy, bound and gap."""
    reports = result.reports
    table = Table(title=f"moeplace solve: {len(reports)} layers, {len(result.workloads)} workloads, "
                        f"{result.seconds:.1f} s", title_justify="left")
    for name in ("layer", "hottest", "greedy", "bound", "gap", "off-home", "remote nodes", "moved", "status"):
        table.add_column(name, justify="right")
    rows = reports if per_layer else ()
    for r in rows:
        table.add_row(str(r.layer), _num(r.hottest, ".4f"), _num(r.greedy_hottest, ".4f"), _num(r.bound, ".4f"),
                      _num(r.gap, ".2%"), f"{r.off_home:.3f}", _num(r.remote_nodes, ".2f"), str(r.moved), r.status)
    if per_layer:
        table.add_section()
    statuses = sorted({r.status for r in reports})
    column = lambda name: np.array([getattr(r, name) for r in reports])  # noqa: E731
    table.add_row(
        "mean",
        _num(column("hottest").mean(), ".4f"),
        _num(column("greedy_hottest").mean(), ".4f"),
        _num(column("bound").mean(), ".4f"),
        _num(column("gap").mean(), ".2%"),
        f"{column('off_home').mean():.3f}",
        _num(column("remote_nodes").mean(), ".2f"),
        str(sum(r.moved for r in reports)),
        "/".join(f"{s}:{sum(r.status == s for r in reports)}" for s in statuses),
    )
    table.add_row("worst", _num(column("hottest").max(), ".4f"), _num(column("greedy_hottest").max(), ".4f"),
                  "", _num(column("gap").max(), ".2%"))
    dispatch = result.placement.provenance.get("options", {}).get("dispatch", "equal")
    table.caption = (f"hottest = max GPU load / mean over the worst planning workload, dispatch '{dispatch}' "
                     "(lower is better, 1 is perfect); greedy = the warm start's, equal split; bound = lower "
                     "bound for any placement; off-home = routed share off its group's node; remote nodes = "
                     "expected distinct nodes besides its source's a token is sent to; status greedy = the "
                     "search found nothing better than the greedy start, kept = the old layout, path = searched "
                     "from it; - = not computed by this method")
    return table


def _num(value: float, fmt: str) -> str:
    """`value` formatted, or "-" where a method does not compute it (NaN)."""
    return "-" if np.isnan(value) else format(value, fmt)


# Longest trace name kept in the table's first column; longer names are numbered, listed below it, so an
# 80-column terminal or pipe shows every name whole (never "decode…") and every column.
NAME_COLUMN = 24


def score_table(scores: list[TraceScore], title: str) -> Group:
    """One row per trace; columns no trace has a value for are left out; headers are words that wrap."""
    columns = {
        "imbalance mean": lambda s: f"{s.imbalance_L.mean():.4f}",
        "worst layer": lambda s: f"{s.imbalance_L.max():.4f}",
        "best split": lambda s: f"{s.imbalance_best_L.mean():.4f}",
        "worst window": lambda s: None if s.worst_window_L is None else f"{s.worst_window_L.mean():.4f}",
        "remote nodes per token": lambda s: f"{s.remote_nodes_L.mean():.2f}" + ("" if s.tokens_from == "samples" else "*"),
        "group span": lambda s: None if s.group_span_L is None else f"{s.group_span_L.mean():.2f}",
    }
    cells = {name: [cell(s) for s in scores] for name, cell in columns.items()}
    shown = [name for name, values in cells.items() if any(v is not None for v in values)]
    names = [Path(s.name).name for s in scores]
    numbered = max(map(len, names), default=0) > NAME_COLUMN
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("trace", no_wrap=True)
    for name in shown:
        table.add_column(name, justify="right", overflow="fold")
    for i, s in enumerate(scores):
        table.add_row(f"#{i + 1}" if numbered else names[i],
                      *("-" if cells[name][i] is None else cells[name][i] for name in shown))
    dispatch = scores[0].dispatch.value if scores else "equal"
    table.caption = (f"imbalance = max / mean GPU load per layer, each expert's tokens dispatched over its replicas "
                     f"by '{dispatch}' ('best split': split to cool the hottest GPU); 1 is perfect, lower is better. "
                     "remote nodes per token: expected distinct nodes besides its source's a token is sent to "
                     "(* drawn from the counts by group-limited routing: no per-token samples); group span: nodes "
                     "a routing group reaches (lower is better). balancedness = 1 / imbalance, in --json")
    legend = [Text(f"#{i + 1}  {name}", overflow="fold") for i, name in enumerate(names)] if numbered else []
    return Group(table, *legend)


def moves_line(report: MoveReport) -> str:
    size = f"{report.bytes / 1e9:.2f} GB" if report.bytes >= 1e9 else f"{report.bytes / 1e6:.2f} MB"
    return (f"experts to move: {report.experts} ({size} at {report.expert_bytes} bytes per expert), "
            f"{int(report.intra_node_L.sum())} of them from a copy on the same node")
