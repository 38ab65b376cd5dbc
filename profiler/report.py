"""`write_report`: a self-contained HTML page of plots of a trace (and of a placement on it), with the
same figures as PNG files beside it (`<stem>_<figure>.png`).

This module chooses the figures, lays out the page and writes the files; the figures themselves are
drawn in `moeplace.profiler.report_figures`, which lists them.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from moeplace.fileio import atomic_write_bytes, check_output
from moeplace.placement import Placement, trivial_placement
from moeplace.placer.evaluate import align
from moeplace.profiler.report_figures import (Plot, Scene, _gpu_plot, _load_plot, _nodes_plot,
                                              _placement_name, _replica_plot, _window_names, _windows_plot)
from moeplace.trace import Trace


def write_report(trace: Trace, out_html: str | Path, placement: Placement | None = None) -> list[Path]:
    """Write the report page `out_html` and its figures as PNG files beside it; returns the paths written.

    A missing output folder is created. ValueError when the output path cannot be a file or the
    placement does not fit the trace (another expert count, or layers the trace lacks). Every file is
    written atomically, and all figures are rendered before the first write, so an error leaves no
    file of this report behind.
    """
    out_html = Path(out_html)
    check_output(out_html)
    folder = out_html.parent if str(out_html.parent) else Path(".")
    scene = _scene(trace, placement)
    # 1. render every figure in memory
    plots, notes = _plots(scene)
    page = _page(scene, plots, notes)
    # 2. write the PNGs, then the page that refers to them; undo this call's files if a write fails
    written: list[Path] = []
    try:
        for plot in plots:
            path = folder / f"{out_html.stem}_{plot.name}.png"
            atomic_write_bytes(path, plot.png)
            written.append(path)
        atomic_write_bytes(out_html, page.encode("utf-8"))
        written.append(out_html)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _scene(trace: Trace, placement: Placement | None) -> Scene:
    if placement is None:
        return Scene(trace, None, np.arange(trace.num_layers), None)
    try:
        rows = align(placement, trace)
    except ValueError as exc:
        raise ValueError(f"{placement.source}: does not fit the trace ({exc})") from None
    before = trivial_placement(placement.num_experts, placement.topology, placement.layers, placement.num_model_layers)
    return Scene(trace, placement, rows, before)


def _plots(scene: Scene) -> tuple[list[Plot], list[str]]:
    plots, notes = [_load_plot(scene.trace)], []
    if scene.placement is not None:
        plots += [_gpu_plot(scene), _replica_plot(scene)]
        nodes = _nodes_plot(scene)
        if nodes is None:
            notes.append("Distinct nodes per token: left out, the trace has no per-token samples and no routing groups.")
        else:
            plots.append(nodes)
    else:
        notes.append("GPU load, replica counts and nodes per token need a placement (none given).")
    if scene.trace.num_windows > 1:
        plots.append(_windows_plot(scene))
    else:
        notes.append("Load over time: left out, the trace has a single window.")
    return plots, notes


# ---- page ---------------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1040px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { text-align: left; padding: .2em .8em .2em 0; vertical-align: top; }
th { color: #555; font-weight: 600; white-space: nowrap; }
td { overflow-wrap: anywhere; }
figure { margin: 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: .92em; }
"""

# Counts the figures the browser decoded, so a headless browser can check the page (tests).
_SCRIPT = """
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
});
"""


def _page(scene: Scene, plots: list[Plot], notes: list[str]) -> str:
    title = f"moeplace report: {scene.trace.metadata.get('model', Path(scene.trace.source).name)}"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _facts(scene))
    figures = "".join(
        f'<figure id="{p.name}"><img alt="{p.name}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>\n"
        for p in plots
    )
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
        f'<body data-figures="{len(plots)}"><h1>{html.escape(title)}</h1>\n<table>{rows}</table>\n'
        f"{figures}{notes_html}</body></html>\n"
    )


def _facts(scene: Scene) -> list[tuple[str, str]]:
    trace, p = scene.trace, scene.placement
    meta = dict(trace.metadata)
    names = _window_names(trace)
    meta.pop("window_names", None)
    windows = str(trace.num_windows) + (f": {', '.join(names[:12])}{' …' if len(names) > 12 else ''}" if names else "")
    if trace.tokens_W is not None:
        tokens = f"{trace.tokens_W.sum():,.0f}"
    else:
        tokens = f"≈ {trace.counts_WLE.sum(axis=2).mean(axis=1).sum() / trace.top_k:,.0f} (routed / top-k)"
    facts = [
        ("model", meta.pop("model", "unknown")),
        ("engine", meta.pop("engine", "unknown")),
        ("trace", trace.source),
        ("windows", windows),
        ("tokens", tokens),
        ("layers", f"{trace.num_layers} MoE layers: {_id_ranges(trace.layers)}"
                   + (f" of {trace.num_model_layers}" if trace.num_model_layers else "")),
        ("experts", f"{trace.num_experts}, top-{trace.top_k}"
                    + (f", {trace.n_group} routing groups, top-{trace.topk_group}" if trace.n_group > 1 else "")),
        ("per-token samples", "none" if trace.topk_ids_TLK is None else f"{trace.topk_ids_TLK.shape[0]:,} tokens"),
    ]
    if trace.time_W is not None:
        facts.append(("recorded", f"{trace.time_W[-1] - trace.time_W[0]:.0f} s from the first window to the last"))
    if p is not None:
        t = p.topology
        facts += [
            ("placement", _placement_name(p)),
            ("topology", f"{t.num_gpus} GPUs, {t.gpus_per_node} per node, {t.slots_per_gpu} slots per GPU "
                         f"({t.num_slots} slots, {t.num_slots - p.num_experts} redundant)"),
        ]
    return facts + sorted(meta.items())


def _id_ranges(ids: np.ndarray) -> str:
    """[3, 4, 5, 9] -> "3–5, 9"."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            a, b = int(ids[start]), int(ids[i - 1])
            parts.append(str(a) if a == b else f"{a}–{b}")
            start = i
    return ", ".join(parts)
