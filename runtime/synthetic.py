"""Synthetic DeepSeek-V3-shaped FP8 checkpoints whose routers follow a real routing trace.

`moeplace make-model` writes a model folder that `moeplace serve --model DIR` serves like a real
DeepSeek-V3 checkpoint: random weights, real shapes and layout.

    config.json                               DeepSeek-V3 fields (runtime/config.py)
    model-00001-of-0000n.safetensors          routers: mlp.gate.weight (bf16), e_score_correction_bias (f32)
    model-00002-of-0000n.safetensors          everything else but the routed experts (FP8 + scales, norms bf16)
    model-00003-of-0000n.safetensors ...      one shard per MoE layer: its routed experts, FP8 e4m3 with
                                              float32 weight_scale_inv per 128x128 block
    model.safetensors.index.json              tensor -> shard
    moeplace_synthetic.json                   how it was made, and how close the routing came to the trace

Presets: `deepseek-v3` is DeepSeek-V3's shapes (hidden 7168, expert intermediate 2048, 256 routed
experts + 1 shared, top-8 from 4 of 8 groups, MLA with 128 heads, q/kv LoRA ranks 1536/512), with
one dense layer first (DeepSeek-V3 has three), default RoPE instead of YaRN, and the byte vocabulary
of the embedded tiny model (`ByteTokenizer`): 44.05 MB per expert, 11.3 GB per MoE layer.
`small` keeps the routing shape (256 experts, 8 groups, top-8) at hidden 256, for tests on CPU.

Weights are drawn on `device` (CUDA makes a DeepSeek layer in seconds) by runtime/synthetic_weights.py,
the same code that makes the embedded tiny model. Router biases are then fitted (runtime/router_fit.py)
so each MoE layer's expert popularity follows one layer of the routing trace. Everything is written into a temporary folder beside the output,
renamed into place at the end.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moeplace.runtime.config import ModelConfig
from moeplace.runtime.synthetic_weights import write_random_checkpoint, write_router_biases
from moeplace.runtime.tokenizer import ByteTokenizer

REPORT_FILE = "moeplace_synthetic.json"
# The DeepSeek-V3 decode statistics beside a development checkout (../shared; not shipped, licence unstated).
DEFAULT_ROUTING_TRACE = (Path(__file__).resolve().parents[2] / "shared" / "traces" / "sglang-dsv3-ep-statistics"
                         / "decode_in1000out1000.json")
MAX_MOE_LAYERS = 60  # DeepSeek-V3 has 58


class Preset(str, enum.Enum):
    deepseek_v3 = "deepseek-v3"
    small = "small"


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """What to generate: preset shapes (a Preset or its name), MoE layers after one dense layer, seed,
    where to draw tensors and fit the routers."""

    preset: Preset
    moe_layers: int
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        names = [p.value for p in Preset]
        if self.preset not in names:  # a Preset is its value too (str enum)
            raise ValueError(f"--preset must be one of {', '.join(names)}, got {self.preset!r}")
        object.__setattr__(self, "preset", Preset(self.preset))
        if isinstance(self.moe_layers, bool) or not isinstance(self.moe_layers, int) \
                or not 1 <= self.moe_layers <= MAX_MOE_LAYERS:
            raise ValueError(f"--moe-layers must be in 1..{MAX_MOE_LAYERS}, got {self.moe_layers!r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"--seed must be in 0..2**31-1, got {self.seed}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")

    def model_config(self) -> ModelConfig:
        tok = ByteTokenizer()
        shapes = {
            Preset.deepseek_v3: dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                     num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
            Preset.small: dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                               num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
                               qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        }[self.preset]
        return ModelConfig(
            vocab_size=tok.vocab_size, num_hidden_layers=1 + self.moe_layers, first_k_dense_replace=1,
            n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
            routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, source=f"preset {self.preset.value}", **shapes,
        )

    @property
    def calibration_sequences(self) -> int:
        """128-byte sequences per calibration text (router_fit.py): more where a GPU makes them cheap."""
        return 128 if self.preset is Preset.deepseek_v3 else 8

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")


def make_model(out_dir: Path, spec: SyntheticSpec, routing_trace: Path | None = None,
               trace_layers: list[int] | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Write the checkpoint of `spec` to the new folder `out_dir`; returns the report (also in REPORT_FILE).

    routing_trace: any trace file moeplace reads (default DEFAULT_ROUTING_TRACE), with 256 experts;
    trace_layers: its model layer ids to follow, one per MoE layer (default: evenly spaced rows).
    ValueError for anything a user can get wrong, before anything is written.
    """
    from moeplace.runtime.router_fit import fit_router_biases

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir}: already exists (choose a new folder)")
    if not out_dir.parent.is_dir():
        raise ValueError(f"{out_dir}: output folder {out_dir.parent} does not exist")
    config = spec.model_config()
    trace_path = Path(routing_trace) if routing_trace is not None else DEFAULT_ROUTING_TRACE
    targets_LE, layers = target_shares(trace_path, config, trace_layers)
    need, free = checkpoint_bytes(config), shutil.disk_usage(out_dir.parent).free
    if need > free:
        raise ValueError(f"{out_dir}: the checkpoint needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free there")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        seconds = {}
        start = time.monotonic()
        write_random_checkpoint(tmp, config, spec.seed, spec.torch_device, log=log)
        seconds["weights"] = time.monotonic() - start
        log(f"weights written in {seconds['weights']:.1f} s; fitting the router biases")
        start = time.monotonic()
        biases_LE, quality = fit_router_biases(tmp, targets_LE, spec.torch_device, spec.calibration_sequences, log)
        write_router_biases(tmp, config, biases_LE)
        seconds["router_fit"] = time.monotonic() - start
        report = {"preset": spec.preset.value, "moe_layers": spec.moe_layers, "seed": spec.seed,
                  "device": spec.device, "routing_trace": str(trace_path), "trace_layers": layers,
                  "model_layers": config.moe_layers, "expert_bytes": expert_bytes(config),
                  "seconds": seconds, "popularity": quality}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and the shard writer make them private
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def target_shares(trace_path: Path, config: ModelConfig, trace_layers: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """[L, E] float64 share of (token, expert) assignments per expert, for each MoE layer of `config`,
    from the trace's layers `trace_layers` (default: L rows evenly spaced over the trace); their ids."""
    from moeplace.readers import load_trace

    if not Path(trace_path).exists():
        hint = " (the default needs ../shared beside the checkout; pass --routing-trace)" \
            if trace_path == DEFAULT_ROUTING_TRACE else ""
        raise ValueError(f"{trace_path}: routing trace not found{hint}")
    trace = load_trace(trace_path)
    E, L = config.n_routed_experts, len(config.moe_layers)
    if trace.num_experts != E:
        raise ValueError(f"{trace_path}: trace has {trace.num_experts} experts, the model {E}")
    if trace_layers is None:
        rows = np.linspace(0, trace.num_layers - 1, L).round().astype(int)
    else:
        if len(trace_layers) != L:
            raise ValueError(f"--trace-layer given {len(trace_layers)} times, the model has {L} MoE layers")
        missing = [l for l in trace_layers if l not in trace.layers]
        if missing:
            raise ValueError(f"{trace_path}: no layer {missing[0]} (it has layers "
                             f"{trace.layers[0]}..{trace.layers[-1]}, {trace.num_layers} of them)")
        rows = np.array([int(np.flatnonzero(trace.layers == l)[0]) for l in trace_layers])
    counts_LE = trace.counts_WLE.sum(axis=0)[rows]
    empty = np.flatnonzero(counts_LE.sum(axis=1) == 0)
    if len(empty):
        raise ValueError(f"{trace_path}: layer {int(trace.layers[rows[empty[0]]])} routed no tokens")
    return counts_LE / counts_LE.sum(axis=1, keepdims=True), trace.layers[rows].tolist()


def expert_bytes(config: ModelConfig) -> int:
    """Bytes of one routed expert as stored: gate, up, down FP8 and their float32 block scales."""
    F, D = config.moe_intermediate_size, config.hidden_size
    bn, bk = config.weight_block_size
    return 3 * F * D + 4 * (2 * math.ceil(F / bn) * math.ceil(D / bk) + math.ceil(D / bn) * math.ceil(F / bk))


def checkpoint_bytes(config: ModelConfig) -> int:
    """About the bytes the checkpoint takes: every weight one FP8 byte per parameter (scales, norms,
    embeddings and routers are a fraction of a percent at DeepSeek-V3 shapes, but not at small ones)."""
    D, H, F = config.hidden_size, config.num_attention_heads, config.moe_intermediate_size
    attention = (D * config.q_lora_rank + config.q_lora_rank * H * (config.qk_nope_head_dim + config.qk_rope_head_dim)
                 + D * (config.kv_lora_rank + config.qk_rope_head_dim)
                 + config.kv_lora_rank * H * (config.qk_nope_head_dim + config.v_head_dim) + H * config.v_head_dim * D)
    L = len(config.moe_layers)
    dense = config.num_hidden_layers * attention + 3 * D * config.intermediate_size + 3 * D * F * L
    return int(1.05 * (L * config.n_routed_experts * expert_bytes(config) + dense)) + (1 << 26)
