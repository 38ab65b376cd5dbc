"""benchmarks/kernels.py --cpu-smoke: the sweep, the table it writes, and fused_moe, on tiny shapes (timed and
summarised by benchmarks/kernels_timing.py, which the smoke runs too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplace.kernels.gemm_table import GemmKind, lookup

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.mark.slow
def test_cpu_smoke_writes_a_table_the_dispatcher_reads(tmp_path):
    table, rows = tmp_path / "table.json", tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--table", str(table), "--json", str(rows)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SUMMARY" in done.stdout
    card = next(iter(json.loads(table.read_text())["cards"]))
    entry = lookup(GemmKind.swiglu, 24 / 6, 256, 256, card, table)  # decode E6: gate/up+SwiGLU, N = 2F, K = D
    assert entry is not None and entry.best.backend.value in ("triton", "triton_tma")
    measured = json.loads(rows.read_text())["rows"]
    assert not [r for r in measured if "error" in r], "every smoke candidate runs"
    errs = [float(r["note"].split()[-1]) for r in measured if r.get("note", "").startswith("rel err")]
    assert errs and max(errs) < 1e-5, "the interpreter sums exactly in fp32"
