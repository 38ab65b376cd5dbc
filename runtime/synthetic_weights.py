"""Random DeepSeek-V3-architecture FP8 weights written as a Hugging Face checkpoint: the one source of
synthetic tensors, for the embedded tiny model (runtime/tiny.py) and `moeplace make-model`
(runtime/synthetic.py). Router biases are written zero here and fitted afterwards (router_fit.py).

Shards, in order: 1 the routers (`mlp.gate.weight` bf16, `e_score_correction_bias` float32), 2 every
other tensor but the routed experts (FP8 + float32 `weight_scale_inv` per 128x128 block, norms and
embeddings bf16), then one shard per MoE layer's routed experts. Each shard's tensors come from one
generator on `device`, seeded from (seed, layer, part): the same seed on the same device type gives the
same checkpoint. `sharded=False` writes everything into one `model.safetensors` (small models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moeplace.kernels.fp8 import quant_weight_blocks_ref
from moeplace.runtime.checkpoint import INDEX_FILE
from moeplace.runtime.config import ModelConfig

SINGLE_FILE = "model.safetensors"


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def random_tensors(config: ModelConfig, seed: int = 0, device: torch.device = torch.device("cpu")) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint of `config` for `seed`, on the host (for small configs)."""
    return {name: t for shard in _shards(config, seed, device) for name, t in shard.items()}


def write_random_checkpoint(out_dir: Path, config: ModelConfig, seed: int, device: torch.device, *,
                            sharded: bool = True, log: Callable[[str], None] = lambda _: None) -> None:
    """config.json and the weights into the existing folder `out_dir`, router biases zero. Sharded: one
    file per shard and the index, one shard in memory at a time; else one `model.safetensors`."""
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    if not sharded:
        save_file(random_tensors(config, seed, device), out_dir / SINGLE_FILE, metadata={"format": "pt"})
        return
    total, weight_map = 2 + len(config.moe_layers), {}
    start = time.monotonic()
    for index, tensors in enumerate(_shards(config, seed, device), start=1):
        save_file(tensors, out_dir / shard_name(index, total), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard_name(index, total)))
        if index > 2:
            log(f"layer {config.moe_layers[index - 3]}: {config.n_routed_experts} experts in "
                f"{time.monotonic() - start:.1f} s")
        start = time.monotonic()
    size = sum((out_dir / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")


def write_router_biases(out_dir: Path, config: ModelConfig, biases_LE: np.ndarray) -> None:
    """Rewrite the file holding the routers with biases_LE [L, E] (the gate weights as they are)."""
    path = out_dir / (shard_name(1, 2 + len(config.moe_layers)) if (out_dir / INDEX_FILE).exists() else SINGLE_FILE)
    tensors = load_file(path)
    for row, layer in enumerate(config.moe_layers):
        name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        tensors[name] = torch.as_tensor(biases_LE[row], dtype=torch.float32)
    save_file(tensors, path, metadata={"format": "pt"})


def _shards(config: ModelConfig, seed: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    yield _router_tensors(config, seed, device)
    yield _dense_tensors(config, seed, device)
    for layer in config.moe_layers:
        yield expert_tensors(config, seed, device, layer)


def _router_tensors(config: ModelConfig, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for layer in config.moe_layers:
        gen = _Tensors(device, _seed(seed, layer, 0), config.weight_block_size)
        out[f"model.layers.{layer}.mlp.gate.weight"] = gen.router(config.n_routed_experts, config.hidden_size)
        out[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = torch.zeros(config.n_routed_experts)
    return out


def _dense_tensors(config: ModelConfig, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Embeddings, norms, attention, the dense MLP, shared experts, head: all but routers and routed experts."""
    D, V, H = config.hidden_size, config.vocab_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    gen = _Tensors(device, _seed(seed, 0, 1), config.weight_block_size)
    out = {"model.embed_tokens.weight": gen.normal(V, D).bfloat16().cpu(), "model.norm.weight": gen.norm(D),
           "lm_head.weight": (gen.normal(V, D) / D**0.5).bfloat16().cpu()}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = gen.norm(D)
        out[f"{p}.post_attention_layernorm.weight"] = gen.norm(D)
        out[f"{p}.self_attn.q_a_layernorm.weight"] = gen.norm(config.q_lora_rank)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = gen.norm(config.kv_lora_rank)
        gen.fp8(out, f"{p}.self_attn.q_a_proj", config.q_lora_rank, D)
        gen.fp8(out, f"{p}.self_attn.q_b_proj", H * qk, config.q_lora_rank)
        gen.fp8(out, f"{p}.self_attn.kv_a_proj_with_mqa", config.kv_lora_rank + config.qk_rope_head_dim, D)
        gen.fp8(out, f"{p}.self_attn.kv_b_proj", H * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
        gen.fp8(out, f"{p}.self_attn.o_proj", D, H * config.v_head_dim)
        if layer < config.first_k_dense_replace:
            gen.mlp(out, f"{p}.mlp", config.intermediate_size, D)
        else:
            gen.mlp(out, f"{p}.mlp.shared_experts", config.moe_intermediate_size * config.n_shared_experts, D)
    return out


def expert_tensors(config: ModelConfig, seed: int, device: torch.device, layer: int) -> dict[str, torch.Tensor]:
    """The routed experts of MoE layer `layer`: one shard."""
    gen = _Tensors(device, _seed(seed, layer, 2), config.weight_block_size)
    out: dict[str, torch.Tensor] = {}
    for e in range(config.n_routed_experts):
        gen.mlp(out, f"model.layers.{layer}.mlp.experts.{e}", config.moe_intermediate_size, config.hidden_size)
    return out


def _seed(seed: int, layer: int, part: int) -> int:
    return (seed * 1000 + layer) * 4 + part


class _Tensors:
    """Random tensors drawn on `device` from one generator, handed back on the host (as save_file wants)."""

    def __init__(self, device: torch.device, seed: int, block: tuple[int, int]) -> None:
        self.device, self.block = device, block
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.gen, device=self.device)

    def norm(self, size: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(size, generator=self.gen, device=self.device)).bfloat16().cpu()

    def router(self, experts: int, hidden: int) -> torch.Tensor:
        # std 1/sqrt(D) on RMS-normalised inputs: logits about N(0, 1), sigmoid scores well spread.
        return (self.normal(experts, hidden) / hidden**0.5).bfloat16().cpu()

    def fp8(self, out: dict, name: str, rows: int, cols: int) -> None:
        # std 1/sqrt(fan_in): activations keep their scale through the layers.
        w, scale = quant_weight_blocks_ref(self.normal(rows, cols) / cols**0.5, self.block)
        out[name + ".weight"], out[name + ".weight_scale_inv"] = w.cpu(), scale.cpu()

    def mlp(self, out: dict, prefix: str, hidden: int, dim: int) -> None:
        self.fp8(out, prefix + ".gate_proj", hidden, dim)
        self.fp8(out, prefix + ".up_proj", hidden, dim)
        self.fp8(out, prefix + ".down_proj", dim, hidden)
