"""The embedded default model: a tiny DeepSeek-V3-architecture FP8 checkpoint, generated from a seed.

4 layers (layer 0 dense, layers 1-3 MoE), hidden 256, 64 routed experts in 8 groups, top-8 from 4
groups, 1 shared expert, expert intermediate 128, multi-head latent attention, byte vocabulary
(`ByteTokenizer`). Written once, in the Hugging Face layout (config.json + one model.safetensors with
FP8 weights and 128x128 block scales), to `$MOEPLACE_CACHE` (default ~/.cache/moeplace).

Made like any `moeplace make-model` checkpoint: random weights from runtime/synthetic_weights.py, then
router biases fitted by runtime/router_fit.py so each MoE layer's expert popularity follows the real
OLMoE-1B-7B routing counts of the embedded trace (`moeplace.resources.EXAMPLE_TRACE`; its layers 0, 7,
15 -> tiny MoE layers 1, 2, 3; all six text domains summed). The bias pulls the popularity towards the
trace; the text the model reads moves it around that, as a real workload shift does. How close it
gets: benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from moeplace.resources import EXAMPLE_TRACE
from moeplace.runtime.config import ModelConfig
from moeplace.runtime.router_fit import fit_router_biases
from moeplace.runtime.synthetic_weights import write_random_checkpoint, write_router_biases
from moeplace.runtime.tokenizer import ByteTokenizer

TINY_VERSION = 2  # bump when the generated tensors change: the cache folder name carries it
FIT_SEQUENCES = 16  # 128-byte sequences of calibration text the routers are fitted on


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
    config, cpu = tiny_config(), torch.device("cpu")
    with _one_thread():
        write_random_checkpoint(out_dir, config, seed, cpu, sharded=False)
        biases_LE, _ = fit_router_biases(out_dir, olmoe_shares(), cpu, FIT_SEQUENCES)
        write_router_biases(out_dir, config, biases_LE)


def olmoe_shares(trace_path: Path = EXAMPLE_TRACE) -> np.ndarray:
    """[3, 64] float64: each OLMoE layer's share of (token, expert) assignments per expert, domains summed."""
    from moeplace.readers import load_trace

    counts_LE = load_trace(trace_path).counts_WLE.sum(axis=0)
    return counts_LE / counts_LE.sum(axis=1, keepdims=True)


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
