"""The report's figures, each rendered in memory to PNG bytes (`Plot`); `moeplace.profiler.report`
chooses which to draw and writes the page. Separate from it: drawing is matplotlib work, the page is
HTML and files.

Figures (dimension letters as in `moeplace.trace`; G GPUs):
- `load`:     share of each layer's load per expert, [L, E] heat-map.
- `gpu_load`: GPU load / layer mean before (slot p holds expert p % E) and after the placement, [L, G]
              heat-maps, equal split over replicas, and imbalance per layer (with a placement).
- `replicas`: replicas per expert, [L, E] heat-map (with a placement).
- `nodes`:    distinct nodes per sampled token before/after (with a placement and per-token samples),
              else the nodes a routing group spans (n_group > 1), else left out with a note.
- `windows`:  tokens and imbalance per window (with several windows).
Matplotlib is driven through `Figure` + the Agg canvas, never pyplot, so no global state is touched.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from moeplace.placement import Placement
from moeplace.placer.evaluate import distinct_nodes, gpu_load_LG, group_span, imbalance
from moeplace.trace import Trace

DPI = 100
WIDTH = 10.0  # inches


@dataclass(frozen=True)
class Plot:
    name: str  # file suffix: <stem>_<name>.png
    caption: str
    png: bytes


@dataclass(frozen=True)
class Scene:
    """What the figures compare: the trace rows a placement covers and its before/after layouts."""

    trace: Trace
    placement: Placement | None
    rows: np.ndarray  # [L'] trace rows of the placement's layers (all rows without a placement)
    before: Placement | None  # trivial layout on the placement's topology

    @property
    def total_LE(self) -> np.ndarray:
        return self.trace.counts_WLE[:, self.rows].sum(axis=0)


def _load_plot(trace: Trace) -> Plot:
    total_LE = trace.counts_WLE.sum(axis=0)
    share_LE = 100 * total_LE / np.maximum(total_LE.sum(axis=1, keepdims=True), 1e-300)
    fig = Figure(figsize=(WIDTH, _heat_height(trace.num_layers)), layout="constrained")
    ax = fig.add_subplot()
    im = _heatmap(ax, share_LE, trace.layers, "viridis", None, "logical expert")
    fig.colorbar(im, ax=ax, label="% of the layer's load")
    hot = share_LE.max(axis=1)
    ax.set_title(f"Expert load per layer (uniform = {100 / trace.num_experts:.2f}%; hottest expert "
                 f"{hot.mean():.2f}% on average, {hot.max():.2f}% at most)")
    return Plot("load", "Share of each layer's routed tokens taken by each logical expert, all windows.", _png(fig))


def _gpu_plot(scene: Scene) -> Plot:
    p, total_LE = scene.placement, scene.total_LE
    rel = {}
    for name, layout in (("before", scene.before), ("after", p)):
        load_LG = gpu_load_LG(layout, total_LE)
        rel[name] = load_LG / np.maximum(load_LG.mean(axis=1, keepdims=True), 1e-300)
    imb = {name: imbalance(r) for name, r in rel.items()}
    hi = max(float(max(r.max() for r in rel.values())), 1.001)
    lo = min(float(min(r.min() for r in rel.values())), 0.999)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi)
    fig = Figure(figsize=(WIDTH, _heat_height(p.num_layers) + 2.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[_heat_height(p.num_layers), 2.5])
    titles = {"before": f"before: slot p holds expert p % {p.num_experts}", "after": f"after: {_placement_name(p)}"}
    for col, name in enumerate(("before", "after")):
        ax = fig.add_subplot(grid[0, col])
        im = _heatmap(ax, rel[name], p.layers, "RdBu_r", norm, "GPU")
        ax.set_title(f"{titles[name]}\nimbalance {imb[name].mean():.3f} mean, {imb[name].max():.3f} worst layer",
                     fontsize=10)
    fig.colorbar(im, ax=fig.axes, label="GPU load / layer mean")
    ax = fig.add_subplot(grid[1, :])
    for name, style in (("before", "o--"), ("after", "s-")):
        ax.plot(np.arange(p.num_layers), imb[name], style, label=name, markersize=3)
    _layer_axis(ax, p.layers, "x")
    ax.axhline(1.0, color="0.75", linewidth=0.8)
    ax.set_ylabel("max / mean")
    ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"GPU load, {p.topology.num_gpus} GPUs, equal split over replicas")
    caption = (f"Tokens each GPU serves relative to the layer's mean (red: hotter), before and after the placement; "
               f"imbalance = max / mean. Before = the trivial layout on the same {p.topology.num_slots} slots.")
    return Plot("gpu_load", caption, _png(fig))


def _replica_plot(scene: Scene) -> Plot:
    p = scene.placement
    counts_LE = p.replica_count_LE
    top = int(counts_LE.max())
    norm = BoundaryNorm(np.arange(0.5, top + 1.5), ncolors=256)
    fig = Figure(figsize=(WIDTH, _heat_height(p.num_layers)), layout="constrained")
    ax = fig.add_subplot()
    im = _heatmap(ax, counts_LE, p.layers, "cividis", norm, "logical expert")
    fig.colorbar(im, ax=ax, label="replicas", ticks=np.arange(1, top + 1, max(1, math.ceil(top / 8))))
    extra = int((counts_LE - 1).sum())
    ax.set_title(f"Replicas per expert ({extra} redundant slots over {p.num_layers} layers, "
                 f"{p.topology.num_slots - p.num_experts} per layer)")
    return Plot("replicas", "Slots holding a copy of each logical expert in the placement.", _png(fig))


def _nodes_plot(scene: Scene) -> Plot | None:
    trace, p = scene.trace, scene.placement
    if trace.topk_ids_TLK is not None:
        ids = trace.topk_ids_TLK[:, scene.rows]
        values = {name: distinct_nodes(layout, ids) for name, layout in (("before", scene.before), ("after", p))}
        what, caption = "distinct nodes per sampled token", (
            f"Mean number of nodes a token's {trace.top_k} experts are served from "
            f"({ids.shape[0]} sampled tokens; replicas chosen the way the runtime does).")
    elif trace.n_group > 1:
        values = {name: group_span(layout, scene.total_LE, trace.n_group)
                  for name, layout in (("before", scene.before), ("after", p))}
        what, caption = "nodes a routing group spans", (
            f"No per-token samples: nodes holding a routing group's experts, weighted by the group's load "
            f"({trace.n_group} groups, a token uses {trace.topk_group}).")
    else:
        return None
    fig = Figure(figsize=(WIDTH, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x, width = np.arange(p.num_layers), 0.4
    for shift, name in ((-width / 2, "before"), (width / 2, "after")):
        ax.bar(x + shift, values[name], width, label=f"{name}: {values[name].mean():.3f} mean")
    _layer_axis(ax, p.layers, "x")
    ax.set_ylabel(what)
    ax.set_ylim(0, p.topology.num_nodes + 0.2)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{what[0].upper()}{what[1:]} ({p.topology.num_nodes} nodes)")
    return Plot("nodes", caption, _png(fig))


def _windows_plot(scene: Scene) -> Plot:
    trace = scene.trace
    counts_WLE = trace.counts_WLE[:, scene.rows]
    tokens_W = trace.tokens_W if trace.tokens_W is not None else counts_WLE.sum(axis=2).mean(axis=1) / trace.top_k
    fig = Figure(figsize=(WIDTH, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(trace.num_windows)
    top.bar(x, tokens_W, color="0.6")
    top.set_ylabel("tokens" if trace.tokens_W is not None else "tokens (routed / top-k)")
    top.set_title(f"Load over {trace.num_windows} windows (per-window values, mean over layers)")
    if scene.placement is None:
        expert_imb = np.array([imbalance(c).mean() for c in counts_WLE])
        bottom.plot(x, expert_imb, "^-", markersize=3, label=f"expert max / mean (worst {expert_imb.max():.3f})")
    else:  # GPU imbalance only: the expert-level one is several times larger and would flatten these lines
        for name, layout, style in (("before", scene.before, "o--"), ("after", scene.placement, "s-")):
            gpu_imb = np.array([imbalance(gpu_load_LG(layout, c)).mean() for c in counts_WLE])
            bottom.plot(x, gpu_imb, style, markersize=3, label=f"GPU imbalance {name} (worst {gpu_imb.max():.3f})")
    bottom.set_ylabel("max / mean")
    bottom.legend(fontsize=8, loc="best")
    _window_axis(bottom, trace)
    caption = ("Tokens per window, and how unevenly each window loads the "
               + ("GPUs (equal split)." if scene.placement is not None else "experts (max / mean over experts)."))
    return Plot("windows", caption, _png(fig))


# ---- figure helpers -----------------------------------------------------------------------------------
def _heatmap(ax, data_LX: np.ndarray, layers: np.ndarray, cmap: str, norm, xlabel: str):
    im = ax.imshow(data_LX, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    _layer_axis(ax, layers, "y")
    ax.set_xlabel(xlabel)
    return im


def _layer_axis(ax, layers: np.ndarray, axis: str) -> None:
    """Label row indices with model layer ids, at most ~16 ticks."""
    step = max(1, math.ceil(len(layers) / 16))
    ticks = np.arange(0, len(layers), step)
    labels = [str(int(layers[i])) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("layer")
    else:
        ax.set_yticks(ticks, labels)
        ax.set_ylabel("layer")


def _window_axis(ax, trace: Trace) -> None:
    names = _window_names(trace)
    W = trace.num_windows
    if names is not None and W <= 24:
        ax.set_xticks(np.arange(W), names, rotation=30 if max(map(len, names)) > 6 else 0, ha="right")
        ax.set_xlabel("window")
    elif trace.time_W is not None:
        step = max(1, math.ceil(W / 12))
        ticks = np.arange(0, W, step)
        ax.set_xticks(ticks, [f"{trace.time_W[i] - trace.time_W[0]:.0f}" for i in ticks])
        ax.set_xlabel("window start, seconds from the first")
    else:
        ax.set_xlabel("window")


def _window_names(trace: Trace) -> list[str] | None:
    try:
        names = json.loads(trace.metadata.get("window_names", "null"))
    except json.JSONDecodeError:  # free-form metadata: a bad value only costs the labels
        return None
    if not isinstance(names, list) or len(names) != trace.num_windows:
        return None
    return [str(n) for n in names]


def _heat_height(rows: int) -> float:
    return min(9.0, 1.8 + 0.11 * rows)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _placement_name(p: Placement) -> str:
    solver = p.provenance.get("solver")
    return Path(p.source).name + (f" ({solver})" if solver else "")
