"""The Gluon Hopper kernel (kernels/grouped_gemm_gluon.py): compiled for sm_90a on any machine, where the
compiled code must keep the newest K block's wgmma running through the promotion, and its numerics on a
Hopper GPU (the float64 comparisons in test_grouped_gemm.py run its tiles too, through the dispatcher)."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from moeplace.kernels._triton import HAS_GLUON
from moeplace.kernels.gemm_table import Backend, GemmConfig, gluon_takes, gluon_warps
from moeplace.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_ref, grouped_gemm_swiglu_fp8, \
    grouped_gemm_swiglu_ref
from moeplace.kernels.grouped_gemm_gluon import halves

from gemm_operands import block_weights, sorted_activations

G = dict(backend=Backend.gluon)
# the benchmark's prefill tiles (benchmarks/kernels_sweep.py: gluon_tiles)
PLAIN = [GemmConfig(128, 128, 8, 8, 4, **G), GemmConfig(64, 128, 8, 4, 6, **G),
         GemmConfig(64, 128, 8, 4, 3, **G, programs_per_sm=2),  # two consumer warpgroups, a ring each
         GemmConfig(128, 128, 8, 8, 5, **G, split_m=True)]  # two 4-warp halves of each tile, one ring
SWIGLU = [GemmConfig(64, 128, 8, 8, 4, **G), GemmConfig(64, 128, 8, 8, 5, **G)]

# run in a fresh interpreter: the CPU test session sets TRITON_INTERPRET, under which the Triton helpers the
# kernel calls are interpreted functions, which the compiler cannot take
COMPILE = """
import json, sys
from moeplace.kernels.gemm_table import GemmConfig
from moeplace.kernels.gluon_compiled import compile_for_hopper
r = compile_for_hopper(GemmConfig(**json.loads(sys.argv[1])), sys.argv[2] == "swiglu")
print(json.dumps(dict(shared=r.shared_bytes, registers=r.registers, spills=r.spill_bytes, serialised=r.serialised,
                      threads=r.threads, waits=[r.waits(n) for n in range(3)])))
"""


def compiled(cfg: GemmConfig, swiglu: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cfg_json = json.dumps({**asdict(cfg), "backend": cfg.backend.value})
    out = subprocess.run([sys.executable, "-c", COMPILE, cfg_json, "swiglu" if swiglu else "plain"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_GLUON, reason="Triton without Gluon (3.5+)")
@pytest.mark.parametrize("cfg, swiglu", [(c, False) for c in PLAIN] + [(SWIGLU[0], True)],
                         ids=lambda v: v.label.replace(" ", "-") if isinstance(v, GemmConfig) else str(v))
def test_compiled_for_hopper_the_promotion_runs_beside_the_next_wgmma(cfg, swiglu):
    r = compiled(cfg, swiglu)
    # in the K loop, one wait lets the odd block's wgmma groups run (gate and up under SwiGLU) while the even
    # block is promoted; the other drains (the odd block is promoted beside the next trip's even wgmma)
    running = 2 if swiglu else 1
    consumers = cfg.programs_per_sm * halves(cfg)  # each consumer's code is its own
    assert r["waits"][running] == consumers, f"waits per number of wgmma groups left running: {r['waits']}"
    assert r["waits"][0] == consumers, f"waits per number of groups left running: {r['waits']}"
    assert not r["serialised"], "ptxas serialises the kernel's wgmma (C7514)"
    # SwiGLU's tile holds six 32-register tensors a thread at the cap: ptxas spills a few (36-72 bytes seen
    # with Triton 3.6 and 3.9); the plain tiles none
    assert r["spills"] <= (128 if swiglu else 0), f"{r['spills']} bytes of registers spilled"
    # one program an SM holds every ring (Hopper: up to 227 KB of shared memory a program)
    assert r["shared"] <= 227 * 1024, f"{r['shared']} bytes of shared memory"
    assert r["threads"] == 32 * gluon_warps(cfg), "the occupancy the benchmark reports counts these warps"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", PLAIN, ids=lambda c: c.label.replace(" ", "-"))
def test_gluon_kernel_matches_float64_at_an_ep8_rank(cfg, routing, gen, device, poisoned, rel_err, gemm_tol):
    """An EP8 rank's prefill rows (32 experts, a few empty), K = 16 scale blocks, fp32 and bf16 out."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on Hopper (elsewhere its tiles run in the TMA kernel)")
    ids, _ = routing(1024, 8, 256, local=32)
    _, b, b_s = block_weights(32, 512, 2048, gen)
    b, b_s = b.to(device), b_s.to(device)
    _, plan, a, a_s, used = sorted_activations(ids, 32, 2048, gen, device)
    ref = grouped_gemm_ref(a, a_s, b, b_s, plan.expert_offsets_E1)
    c = grouped_gemm_fp8(a, a_s, b, b_s, plan.expert_offsets_E1, torch.float32, cfg)
    assert rel_err(c[:used], ref[:used]) < gemm_tol and c[used:].isnan().all()
    c16 = grouped_gemm_fp8(a, a_s, b, b_s, plan.expert_offsets_E1, torch.bfloat16, cfg)
    assert rel_err(c16[:used], ref[:used]) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SWIGLU, ids=lambda c: c.label.replace(" ", "-"))
def test_gluon_swiglu_matches_float64_at_an_ep8_rank(cfg, routing, gen, device, poisoned, rel_err):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on Hopper (elsewhere its tiles run in the TMA kernel)")
    ids, _ = routing(1024, 8, 256, local=32)
    _, w13, w13_s = block_weights(32, 1024, 2048, gen)  # F = 512: four quantisation groups a row
    w13, w13_s = w13.to(device), w13_s.to(device)
    _, plan, a, a_s, used = sorted_activations(ids, 32, 2048, gen, device)
    q, s = grouped_gemm_swiglu_fp8(a, a_s, w13, w13_s, plan.expert_offsets_E1, cfg)
    q_ref, s_ref = grouped_gemm_swiglu_ref(a, a_s, w13, w13_s, plan.expert_offsets_E1)
    back = q[:used].double().view(used, -1, 128) * s[:used, :, None]
    back_ref = q_ref[:used].double().view(used, -1, 128) * s_ref[:used, :, None]
    assert rel_err(back, back_ref) < 2e-2 and s[used:].isnan().all() and q[used:].float().isnan().all()


def test_gluon_tiles_it_cannot_hold_are_refused():
    with pytest.raises(AssertionError, match="gluon kernel takes 64- or 128-row tiles of 128 columns"):
        GemmConfig(32, 128, 1, 4, 4, **G)
    with pytest.raises(AssertionError, match="gluon kernel takes 64- or 128-row tiles of 128 columns"):
        GemmConfig(128, 128, 1, 4, 4, **G)
    with pytest.raises(AssertionError, match="two gluon consumers in a program take 4 warps each"):
        GemmConfig(128, 128, 1, 8, 4, **G, programs_per_sm=2)
    with pytest.raises(AssertionError, match="split_m: two 64-row halves of a gluon m128 w8 tile"):
        GemmConfig(64, 128, 1, 8, 4, **G, split_m=True)
    with pytest.raises(AssertionError, match="split_m: two 64-row halves of a gluon m128 w8 tile"):
        GemmConfig(128, 128, 1, 8, 4, backend=Backend.triton_tma, split_m=True)
    # under SwiGLU a 4-warp half would hold gate and up for all 128 columns: the dispatcher never asks
    assert not gluon_takes(GemmConfig(128, 128, 1, 8, 4, **G, split_m=True), swiglu=True)
