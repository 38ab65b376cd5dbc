"""write_report(): the HTML page and its PNG figures on the example trace, with and without a placement,
opened in headless Chromium; large traces; bad input leaves no file behind."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moeplace.resources import EXAMPLE_TRACE
from moeplace.placement import Placement
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.profiler import report
from moeplace.profiler.report import write_report
from moeplace.readers import load_trace
from moeplace.topology import Topology
from moeplace.trace import Trace

REPO = Path(__file__).resolve().parents[2]
TOPO = Topology(8, 4, 10)  # 80 slots for OLMoE's 64 experts, 2 nodes
CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trace() -> Trace:
    return load_trace(EXAMPLE_TRACE)


@pytest.fixture(scope="module")
def placement(trace) -> Placement:
    result = solve([trace], TOPO, SolveOptions(method=Method.greedy, workers=1))
    return replace(result.placement, source="/plans/olmoe.json")


@pytest.fixture(scope="module")
def with_placement(trace, placement, tmp_path_factory) -> list[Path]:
    return write_report(trace, tmp_path_factory.mktemp("report") / "olmoe.html", placement)


def figures(written: list[Path]) -> list[str]:
    html = written[-1]
    return [p.name.removeprefix(f"{html.stem}_").removesuffix(".png") for p in written[:-1]]


def check_page(written: list[Path]) -> str:
    """Every PNG is a valid image and embedded once in the page, which loads nothing from outside."""
    html_path, pngs = written[-1], written[:-1]
    assert html_path.suffix == ".html" and all(p.suffix == ".png" for p in pngs)
    page = html_path.read_text(encoding="utf-8")
    srcs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(srcs) == page.count("<img") == len(pngs)
    for png, src in zip(pngs, srcs):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and base64.b64decode(src) == data
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 150
    assert not re.search(r"https?://", page)
    assert not re.search(r'(src|href)="(?!data:)', page)
    return page


def test_report_without_placement(trace, tmp_path):
    written = write_report(trace, tmp_path / "plain.html")
    assert figures(written) == ["load", "windows"]
    assert sorted(tmp_path.iterdir()) == sorted(written)
    page = check_page(written)
    for fact in ("allenai/OLMoE-1B-7B-0924", "transformers (offline)", "arxiv, book, c4", "3 MoE layers: 0, 7, 15",
                 "64, top-8"):
        assert fact in page
    assert "need a placement" in page


def test_report_with_placement(with_placement):
    assert figures(with_placement) == ["load", "gpu_load", "replicas", "windows"]
    page = check_page(with_placement)
    assert "olmoe.json (moeplace-greedy)" in page and "8 GPUs, 4 per node, 10 slots per GPU" in page
    assert "Distinct nodes per token: left out" in page  # OLMoE: no per-token samples, no routing groups


def test_nodes_figure_from_samples_or_groups(tmp_path):
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 500, size=(1, 2, 16)).astype(float)
    ids = np.stack([[rng.choice(16, 4, replace=False) for _ in range(2)] for _ in range(50)])
    topo = Topology(4, 2, 5)
    placement = Placement(np.tile(np.arange(20) % 16, (2, 1))[:, ::-1], 16, topo, np.array([3, 4]))
    sampled = Trace(counts, np.array([3, 4]), 4, topk_ids_TLK=ids)
    grouped = Trace(counts, np.array([3, 4]), 4, n_group=4, topk_group=2)
    for name, trace, caption in (("sampled", sampled, "50 sampled tokens"), ("grouped", grouped, "4 groups")):
        written = write_report(trace, tmp_path / f"{name}.html", placement)
        assert figures(written) == ["load", "gpu_load", "replicas", "nodes"]
        assert caption in check_page(written)


def test_large_trace_renders_in_seconds(tmp_path):
    rng = np.random.default_rng(0)
    W, L, E = 100, 58, 256  # DeepSeek-V3: 58 MoE layers x 256 experts, 100 windows
    layers = np.arange(3, 61)
    ids = np.argsort(rng.random((2000, L, E)), axis=2)[:, :, :8]
    trace = Trace(np.rint(rng.lognormal(0, 1, (W, L, E)) * 100), layers, 8, topk_ids_TLK=ids,
                  time_W=1.7e9 + 10.0 * np.arange(W), num_model_layers=61, n_group=8, topk_group=4)
    phy2log = np.stack([rng.permutation(np.arange(320) % E) for _ in range(L)])
    placement = Placement(phy2log, E, Topology(64, 8, 5), layers, 61)
    start = time.monotonic()
    written = write_report(trace, tmp_path / "big.html", placement)
    assert time.monotonic() - start < 10.0  # about 2 s on a 16-core CPU machine
    assert figures(written) == ["load", "gpu_load", "replicas", "nodes", "windows"]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium): browser test skipped")
def test_report_renders_in_chromium(with_placement, tmp_path):
    html = with_placement[-1]
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", html.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body ([^>]*)>", done.stdout)
    assert body, f"no <body> in Chromium's DOM dump:\n{done.stdout[:500]}\n{done.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    assert attrs == {"figures": "4", "loaded": "4", "broken": "0"}


def test_placement_for_another_model(trace, placement, tmp_path):
    small = Trace(trace.counts_WLE[:, :, :32], trace.layers, trace.top_k, source="/data/small.safetensors")
    with pytest.raises(ValueError, match=r"/plans/olmoe\.json.*/data/small\.safetensors: has 32 experts"):
        write_report(small, tmp_path / "r.html", placement)
    other_layers = replace(placement, layers=np.array([0, 7, 14]), source="/plans/other.json")
    with pytest.raises(ValueError, match=rf"/plans/other\.json.*{re.escape(str(EXAMPLE_TRACE))}.*layer\(s\) \[14\]"):
        write_report(trace, tmp_path / "r.html", other_layers)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is not a folder"):
        write_report(trace, tmp_path / "file" / "r.html", placement)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_failed_write_leaves_nothing(trace, placement, tmp_path, monkeypatch):
    real_write = report.atomic_write_bytes

    def write_pngs_only(path, data):
        if Path(path).suffix == ".html":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", write_pngs_only)
    with pytest.raises(OSError, match="disk full"):
        write_report(trace, tmp_path / "r.html", placement)
    assert list(tmp_path.iterdir()) == []
