"""The embedded default model: a tiny DeepSeek-V3-architecture FP8 checkpoint, generated from a seed.

4 layers (layer 0 dense, layers 1-3 MoE), hidden 256, 64 routed experts in 8 groups, top-8 from 4
groups, 1 shared expert, expert intermediate 128, multi-head latent attention, byte vocabulary
(`ByteTokenizer`). Written once, in the Hugging Face layout (config.json + model.safetensors with
FP8 weights and 128x128 block scales), to `$MOEPLACE_CACHE` (default ~/.cache/moeplace).

Router biases make each MoE layer's expert popularity follow the real OLMoE-1B-7B routing counts
in moeplace/data/olmoe_routing.safetensors (layers 0, 7, 15 -> tiny MoE layers 1, 2, 3; all six text
domains summed): `e_score_correction_bias` is fitted layer by layer on the hidden states that an
English-like calibration text (`calibration_text`, 2048 bytes) produces in the model itself.
How close it gets (seed 0; share of (token, expert) assignments per expert vs OLMoE's share;
per layer, correlation / total variation distance):
  - the calibration text:                        1.00 / 0.002
  - held-out text of the same kind (3 seeds):    0.87-0.96 / 0.06-0.09
  - English prose (an excerpt of DESIGN.md):     0.54-0.86 / 0.11-0.16
  - random printable ASCII:                      0.25-0.58 / 0.18-0.26
(uniform popularity is at 0.11 / 0.18 / 0.21 from OLMoE's three layers.) The bias pulls the
popularity towards the trace; the text moves it around that, as a real workload shift does.
Generation takes about 4 s on one CPU core (plus importing transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from moeplace.resources import EXAMPLE_TRACE
from moeplace.runtime.config import ModelConfig
from moeplace.kernels.fp8 import quant_weight_blocks_ref
from moeplace.runtime.tokenizer import ByteTokenizer

TINY_VERSION = 1  # bump when the generated tensors change: the cache folder name carries it
CALIBRATION_SEED = 1234
# Words of the calibration text: common English, some of this field's jargon, code and numbers.
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been if more when will would who so no "
    "out up into do time only can two new may other these about than first also over after some like "
    "most then very made what where just through long years three model expert token tokens GPU GPUs "
    "network layer weights data route routing load balance node nodes step batch memory fast slow "
    "def return import for x y self = ( ) [ ] : , ; 0 1 2 8 16 64 128 256 2024 3.14 42 % + - * /"
).split()


def calibration_text(seed: int, num_bytes: int) -> str:
    """English-like text from WORDS: sentences of 4-14 words, capitalised, with punctuation."""
    rng = np.random.default_rng(seed)
    sentences, size = [], 0
    while size < num_bytes:
        words = list(rng.choice(WORDS, size=int(rng.integers(4, 15))))
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + str(rng.choice([".", ".", ".", "?", "!", ":"]))
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)[:num_bytes]


def tiny_config() -> ModelConfig:
    tok = ByteTokenizer()
    return ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=2048, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, source="tiny",
    )


def default_model_dir() -> Path:
    """The model `moeplace serve` uses without --model: the tiny model of seed 0, in the cache."""
    return tiny_model_dir()


def tiny_model_dir(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Folder of the tiny model for `seed`, generated on first use (atomically: concurrent callers are safe)."""
    root = Path(cache_dir or os.environ.get("MOEPLACE_CACHE") or Path.home() / ".cache" / "moeplace")
    final = root / f"tiny-deepseek-v3-s{seed}-v{TINY_VERSION}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        write_tiny_model(tmp, seed)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is shared like any other
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").exists():  # not lost to a concurrent writer: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Generate the checkpoint into the existing folder `out_dir`: weights, then router biases."""
    with _one_thread():
        _write(out_dir, seed)


def _write(out_dir: Path, seed: int) -> None:
    config = tiny_config()
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    tensors = _random_tensors(config, seed)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    for layer_id, bias_E in zip(config.moe_layers, _fit_biases(out_dir, config)):
        tensors[f"model.layers.{layer_id}.mlp.gate.e_score_correction_bias"] = bias_E
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def olmoe_shares(trace_path: Path = EXAMPLE_TRACE) -> np.ndarray:
    """[3, 64] float64: each OLMoE layer's share of (token, expert) assignments per expert, domains summed."""
    from moeplace.readers import load_trace

    counts_LE = load_trace(trace_path).counts_WLE.sum(axis=0)
    return counts_LE / counts_LE.sum(axis=1, keepdims=True)


def _random_tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in a fixed order from one generator; routers' biases zero."""
    gen = torch.Generator().manual_seed(seed)
    D, V, H = config.hidden_size, config.vocab_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: int, cols: int) -> None:
        # std 1/sqrt(fan_in): activations keep their scale through the layers.
        w = torch.randn(rows, cols, generator=gen) / cols**0.5
        out[name + ".weight"], out[name + ".weight_scale_inv"] = quant_weight_blocks_ref(w, config.weight_block_size)

    def norm(name: str, size: int) -> None:
        out[name + ".weight"] = (1 + 0.1 * torch.randn(size, generator=gen)).bfloat16()

    def mlp(prefix: str, hidden: int) -> None:
        linear(prefix + ".gate_proj", hidden, D)
        linear(prefix + ".up_proj", hidden, D)
        linear(prefix + ".down_proj", D, hidden)

    out["model.embed_tokens.weight"] = torch.randn(V, D, generator=gen).bfloat16()
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        norm(f"{p}.input_layernorm", D)
        norm(f"{p}.post_attention_layernorm", D)
        linear(f"{p}.self_attn.q_a_proj", config.q_lora_rank, D)
        norm(f"{p}.self_attn.q_a_layernorm", config.q_lora_rank)
        linear(f"{p}.self_attn.q_b_proj", H * qk, config.q_lora_rank)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", config.kv_lora_rank + config.qk_rope_head_dim, D)
        norm(f"{p}.self_attn.kv_a_layernorm", config.kv_lora_rank)
        linear(f"{p}.self_attn.kv_b_proj", H * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
        linear(f"{p}.self_attn.o_proj", D, H * config.v_head_dim)
        if layer < config.first_k_dense_replace:
            mlp(f"{p}.mlp", config.intermediate_size)
            continue
        out[f"{p}.mlp.gate.weight"] = (torch.randn(config.n_routed_experts, D, generator=gen) / D**0.5).bfloat16()
        out[f"{p}.mlp.gate.e_score_correction_bias"] = torch.zeros(config.n_routed_experts)
        mlp(f"{p}.mlp.shared_experts", config.moe_intermediate_size * config.n_shared_experts)
        for e in range(config.n_routed_experts):
            mlp(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
    norm("model.norm", D)
    out["lm_head.weight"] = (torch.randn(V, D, generator=gen) / D**0.5).bfloat16()
    return out


@contextmanager
def _one_thread():
    # Generation works on small tensors, where OpenMP's fork/join per op costs more than the op
    # (10x slower with 2 threads on a 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Captured(Exception):
    """Raised by the capture hook: the layers after the one being fitted need not run."""


def _fit_biases(model_dir: Path, config: ModelConfig, steps: int = 200) -> list[torch.Tensor]:
    """Per MoE layer, the correction bias whose routing of the calibration hidden states matches OLMoE."""
    from moeplace.runtime.model import EPModel
    from moeplace.runtime.routing import RouterConfig, select_experts

    model = EPModel.load(model_dir, None, group=None, device=torch.device("cpu"))
    targets_LE = torch.as_tensor(olmoe_shares(), dtype=torch.float32)
    ids = ByteTokenizer().encode(calibration_text(CALIBRATION_SEED, 16 * 128), add_bos=False)
    input_ids_BT = torch.tensor(ids).view(16, 128)
    router = RouterConfig.from_model(config)
    biases = []
    for row, moe in enumerate(model.moe_layers):
        logits_TE = _moe_input(model, moe, input_ids_BT) @ moe.gate.weight.T
        target_E = targets_LE[row % len(targets_LE)]
        bias_E = torch.zeros(config.n_routed_experts)
        for step in range(steps):
            ids_TK, _ = select_experts(logits_TE, bias_E, router)
            share_E = torch.bincount(ids_TK.reshape(-1), minlength=len(bias_E)) / ids_TK.numel()
            # Raise under-used experts, lower over-used ones, relative to their target; decaying steps.
            bias_E += 0.05 * (0.98**step) * (target_E - share_E) / target_E.mean()
        bias_E = torch.round(bias_E * 4096) / 4096  # coarse grid: stable under last-bit float differences
        moe.gate.e_score_correction_bias.copy_(bias_E)  # later layers see this layer's fitted routing
        biases.append(bias_E)
    return biases


def _moe_input(model, moe, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B*T, D] hidden states entering `moe` when the model reads input_ids_BT."""
    captured = []

    def capture(module, args, out):
        captured.append(out.reshape(-1, out.shape[-1]))
        raise _Captured

    # The MoE layer's input is its decoder layer's post-attention norm's output.
    handle = model.hf_model.model.layers[moe.layer_id].post_attention_layernorm.register_forward_hook(capture)
    try:
        model.forward(input_ids_BT, torch.ones_like(input_ids_BT))
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]
