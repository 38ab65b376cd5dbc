"""Synthetic DeepSeek-V3-shaped checkpoints (runtime/synthetic.py, router_fit.py), `moeplace make-model`,
and the full-loop benchmark's preparation; its CPU smoke run only with MOEPLACE_FULL_LOOP_SMOKE=1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moeplace.resources import EXAMPLE_TRACE
from moeplace.cli import app
from moeplace.readers import load_trace
from moeplace.runtime.checkpoint import INDEX_FILE, Checkpoint
from moeplace.runtime.model import EPModel
from moeplace.runtime.router_fit import calibration_ids, distance, shares
from moeplace.runtime.synthetic import DEFAULT_ROUTING_TRACE, REPORT_FILE, Preset, SyntheticSpec, make_model, target_shares
from moeplace.runtime.synthetic_weights import expert_tensors
from moeplace.trace import Trace, save_trace

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200"})


def skewed_trace(path: Path, experts: int = 256) -> Path:
    """A trace of 3 layers (ids 3, 10, 20) whose expert popularity is Zipf-like, each layer shuffled."""
    rng = np.random.default_rng(5)
    counts = np.stack([rng.permutation(1e5 / np.arange(1, experts + 1) ** 0.8) for _ in range(3)])
    save_trace(Trace(counts[None], np.array([3, 10, 20]), 8, num_model_layers=21, n_group=8, topk_group=4), path)
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    return skewed_trace(tmp_path_factory.mktemp("trace") / "skewed.safetensors")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, trace) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "model"
    report = make_model(out, SyntheticSpec(Preset.small, moe_layers=2, seed=3), trace, [3, 20])
    return out, report


def test_checkpoint_is_sharded_fp8_in_the_hugging_face_layout(small_model):
    out, report = small_model
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, INDEX_FILE, "config.json", REPORT_FILE])
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards)
    with Checkpoint(out) as ckpt:  # validates config.json against the stored shapes
        config = ckpt.config
        assert (config.hidden_size, config.n_routed_experts, config.num_experts_per_tok, config.moe_layers) == (256, 256, 8, [1, 2])
        w = ckpt.read_expert(2, 255)
        assert w.w13_FD.dtype == torch.float8_e4m3fn and w.w13_FD.shape == (256, 256)
        assert w.w13_sinv_fd.dtype == torch.float32 and w.w13_sinv_fd.shape == (2, 2)
        assert w.w13_FD.float().std() > 0 and (w.w2_sinv_df > 0).all()
    # one shard per MoE layer holds exactly that layer's experts; routers in the first shard
    with safe_open(str(out / shards[3]), framework="pt") as f:
        assert {k.split(".")[2] for k in f.keys()} == {"2"} and len(list(f.keys())) == 256 * 6
    with safe_open(str(out / shards[0]), framework="pt") as f:
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # fitted, not the zeros written first
    assert report["trace_layers"] == [3, 20] and report["model_layers"] == [1, 2] and report["expert_bytes"] == 98328


def test_popularity_follows_the_trace_on_the_models_own_hidden_states(small_model, trace):
    out, report = small_model
    fit = report["popularity"]
    assert min(fit["fit"]["corr"]) > 0.99 and max(fit["fit"]["tvd"]) < 0.03
    assert all(h < u for h, u in zip(fit["held_out"]["tvd"], fit["uniform_tvd"]))
    # Served as the runtime serves it, held-out text of the fitted kind routes as the report says.
    model = EPModel.load(out, None, group=None, device=torch.device("cpu"))
    ids_BT = calibration_ids(8)["held_out"]
    ids_L = model.recompute(ids_BT, torch.ones_like(ids_BT)).ids_L
    targets, _ = target_shares(trace, model.config, [3, 20])
    for row, ids_TK in enumerate(ids_L):
        corr, tvd = distance(shares(ids_TK, 256), targets[row])
        assert abs(tvd - fit["held_out"]["tvd"][row]) < 0.02, (tvd, fit["held_out"])


def test_same_seed_same_tensors_other_seed_others():
    spec, config = SyntheticSpec(Preset.small, 1, seed=3), SyntheticSpec(Preset.small, 1).model_config()
    a, b = (expert_tensors(config, spec.seed, spec.torch_device, 1) for _ in range(2))
    c = expert_tensors(config, 4, spec.torch_device, 1)
    name = "model.layers.1.mlp.experts.7.up_proj.weight"
    assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8))
    assert not torch.equal(a[name].view(torch.uint8), c[name].view(torch.uint8))


def test_deepseek_v3_preset_has_deepseek_shapes():
    config = SyntheticSpec(Preset.deepseek_v3, 4).model_config()
    assert (config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, config.n_shared_experts) == (7168, 2048, 256, 1)
    assert (config.num_experts_per_tok, config.n_group, config.topk_group, config.num_attention_heads) == (8, 8, 4, 128)
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim, config.moe_layers) == (1536, 512, 64, [1, 2, 3, 4])


@pytest.mark.parametrize("kwargs, message", [
    (dict(moe_layers=0), "--moe-layers must be in 1..60, got 0"),
    (dict(moe_layers=2, seed=-1), "--seed must be in 0..2**31-1"),
    (dict(moe_layers=2, device="tpu"), "--device must be cpu or cuda"),
])
def test_bad_spec_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SyntheticSpec(Preset.small, **kwargs)


def test_failures_leave_nothing_behind(tmp_path, trace, monkeypatch):
    spec = SyntheticSpec(Preset.small, 1)
    with pytest.raises(ValueError, match="trace has 64 experts, the model 256"):
        make_model(tmp_path / "a", spec, EXAMPLE_TRACE)
    with pytest.raises(ValueError, match="--trace-layer given 2 times, the model has 1 MoE layers"):
        make_model(tmp_path / "a", spec, trace, [3, 10])
    with pytest.raises(ValueError, match=r"no layer 4 \(it has layers 3..20, 3 of them\)"):
        make_model(tmp_path / "a", spec, trace, [4])
    with pytest.raises(ValueError, match="routing trace not found"):
        make_model(tmp_path / "a", spec, tmp_path / "missing.json")
    monkeypatch.setattr("shutil.disk_usage", lambda _: SimpleNamespace(total=10**6, used=0, free=1000))
    with pytest.raises(ValueError, match="the checkpoint needs 0.1 GB, 0.0 GB are free there"):
        make_model(tmp_path / "a", spec, trace)
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr("moeplace.runtime.router_fit.fit_router_biases", broken)
    with pytest.raises(RuntimeError, match="fit failed"):
        make_model(tmp_path / "a", spec, trace)
    assert list(tmp_path.iterdir()) == []  # no model, no temporary folder


def test_cli_make_model_writes_and_reports(tmp_path, trace):
    result = runner.invoke(app, ["make-model", "--preset", "small", "--moe-layers", "1", "--routing-trace", str(trace),
                                 "--trace-layer", "10", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert re.search(r"layer 1 <- trace layer 10: correlation / total variation fit (0\.99\d|1\.000) / 0\.0", result.output)
    assert f"wrote {tmp_path / 'm'}" in result.output
    assert json.loads((tmp_path / "m" / REPORT_FILE).read_text())["trace_layers"] == [10]


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "--preset must be one of deepseek-v3, small, got 'huge'"),
    (["--moe-layers", "61"], "--moe-layers must be in 1..60, got 61"),
    (["--routing-trace", "nowhere.json"], "nowhere.json: routing trace not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "gpu"], "--device"),
])
def test_cli_make_model_bad_input_is_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["make-model", "--preset", "small", *args, "-o", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not DEFAULT_ROUTING_TRACE.exists(), reason=f"needs {DEFAULT_ROUTING_TRACE} (../shared beside the checkout)")
def test_default_trace_and_full_loop_prepare_give_the_same_targets(tmp_path):
    config = SyntheticSpec(Preset.deepseek_v3, 4).model_config()
    targets, layers = target_shares(DEFAULT_ROUTING_TRACE, config, None)
    assert layers == [3, 22, 41, 60] and np.allclose(targets.sum(axis=1), 1)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "full_loop.py"), "prepare", "--moe-layers", "4",
                    "--out", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    derived, derived_layers = target_shares(tmp_path / "routing.safetensors", config, None)
    assert derived_layers == layers and np.allclose(derived, targets)
    assert load_trace(tmp_path / "routing.safetensors").num_layers == 4  # only those layers travel
