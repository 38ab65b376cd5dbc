"""The embedded tiny model: deterministic from its seed, a real FP8 checkpoint, OLMoE-like popularity;
and its byte tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moeplace.runtime.config import ModelConfig
from moeplace.runtime.model import EPModel
from moeplace.runtime.router_fit import FIT_SEED, calibration_text
from moeplace.runtime.synthetic_weights import random_tensors
from moeplace.runtime.tiny import FIT_SEQUENCES, TINY_VERSION, olmoe_shares, tiny_config, tiny_model_dir
from moeplace.runtime.tokenizer import ByteTokenizer


def tensors_of(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_same_seed_same_checkpoint_written_once(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLACE_CACHE", str(tmp_path))
    cached = tiny_model_dir()
    assert cached.parent == tmp_path and cached.name == f"tiny-deepseek-v3-s0-v{TINY_VERSION}"
    fresh, session = tensors_of(cached), tensors_of(tiny_dir)
    assert fresh.keys() == session.keys()
    assert all(torch.equal(fresh[n].view(torch.uint8), session[n].view(torch.uint8)) for n in fresh)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir() == cached and (cached / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary folder left behind
    other = random_tensors(tiny_config(), seed=1)["model.layers.1.mlp.experts.0.up_proj.weight"]
    assert not torch.equal(other.view(torch.uint8), session["model.layers.1.mlp.experts.0.up_proj.weight"].view(torch.uint8))


def test_checkpoint_layout(tiny_dir):
    assert ModelConfig.load(tiny_dir) == tiny_config()
    tensors = tensors_of(tiny_dir)
    for name in ("model.layers.3.mlp.experts.63.down_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.kv_b_proj.weight"):
        assert tensors[name].dtype == torch.float8_e4m3fn
        assert tensors[name + "_scale_inv"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].shape == (128, 256)
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.2.mlp.gate.weight"].shape == (64, 256)
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in tensors)  # layer 0 is dense


def popularity_distance(model: EPModel, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per MoE layer: (correlation, total variation distance) of expert shares vs OLMoE's."""
    ids = torch.tensor(ByteTokenizer().encode(text, add_bos=False)).view(16, 128)  # as in the fit
    model.forward(ids, torch.ones_like(ids))
    shares = model.collect_stats().counts_LE.astype(float)
    shares /= shares.sum(axis=1, keepdims=True)
    target = olmoe_shares()
    corr = np.array([np.corrcoef(s, t)[0, 1] for s, t in zip(shares, target)])
    return corr, 0.5 * np.abs(shares - target).sum(axis=1)


def test_expert_popularity_follows_olmoe(tiny_dir):
    model = EPModel.load(tiny_dir, None, group=None, device=torch.device("cpu"))
    corr, tvd = popularity_distance(model, calibration_text(FIT_SEED, FIT_SEQUENCES * 128))
    assert (corr > 0.99).all() and (tvd < 0.01).all()  # the text the biases were fitted on
    corr, tvd = popularity_distance(model, calibration_text(7, 16 * 128))  # held-out text of the same kind
    assert (corr > 0.8).all() and (tvd < 0.1).all(), (corr, tvd)
    uniform_tvd = 0.5 * np.abs(olmoe_shares() - 1 / 64).sum(axis=1)
    assert (tvd < uniform_tvd).all()  # closer to OLMoE's popularity than to uniform


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_id and ids[1:3] == [104, 0xC3] and len(ids) == 1 + len("héllo ✓".encode())
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "héllo ✓"
    assert tok.decode(tok.encode("✓", add_bos=False)[:2]) == "\ufffd"  # cut inside a character
    with pytest.raises(ValueError, match=r"token id 259 is outside the byte vocabulary \[0, 259\)"):
        tok.decode([1, 259])
    assert tiny_config().vocab_size == tok.vocab_size and tiny_config().bos_token_id == tok.bos_id
