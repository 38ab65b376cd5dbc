"""benchmarks/serve.py --cpu-smoke: the tiny model on 2 gloo ranks, one load level on the trivial then the
solved placement (resharded live), then through the decode-step graphs' path (eager on CPU), micro
timings; the JSON holds every number the table prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.mark.slow
def test_serve_benchmark_cpu_smoke(tiny_dir, tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--model", str(tiny_dir), "--workdir",
                           str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["gpus"] == 2 and r["moe_layers"] == 3 and r["reshard"]["state"] == "done"
    for name in ("trivial", "solved", "solved_graphs"):
        (level,) = r[name]
        assert level["concurrency"] == 4 and level["requests_done"] >= 4
        assert level["output_tokens_per_s"] > 0 and level["itl_ms_p50"] > 0
    micro = r["micro"]
    assert micro["moe_decode_ms"] > 0 and micro["decode_step_ms_ctx2048"] > 0 and micro["slot_bytes"] > 0
    assert micro["decode_graph_ms_ctx128"] > 0 and micro["decode_graph_vs_eager_max_abs_ctx128"] == 0  # eager on CPU
    assert "layer-tok/s/GPU" in done.stdout.splitlines()[-4]  # the table comes last
