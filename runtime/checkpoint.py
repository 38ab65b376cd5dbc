"""`Checkpoint`: a DeepSeek-V3-family model folder in the Hugging Face layout, read one tensor at a time.

    config.json
    model.safetensors                      or  model-0000i-of-0000n.safetensors + model.safetensors.index.json
      model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight             float8_e4m3fn [F, D] / [D, F]
      model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight_scale_inv   float32 per 128x128 block
      model.layers.{L}.mlp.gate.weight, .e_score_correction_bias, mlp.shared_experts.*, self_attn.*, ...

Tensors are opened lazily (safetensors memory-maps the files and `get_slice` reads only the bytes of
the tensor asked for), so a rank that holds 16 of 256 experts reads 16 experts, never the whole file.
Every problem is a `ValueError` naming the file and the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moeplace.runtime.config import ModelConfig
from moeplace.kernels.fp8 import dequant_weight_blocks_ref, scale_shape

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8 = "F8_E4M3"


def expert_tensor(layer: int, expert: int, proj: str) -> str:
    """Name of a routed expert's weight; proj is gate_proj, up_proj or down_proj."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def scale_name(weight_name: str) -> str:
    return weight_name + "_scale_inv"


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """One routed expert as stored: gate and up stacked (gate rows first), FP8 + block scales.

    w13_FD [2F, D] float8_e4m3fn, w13_sinv_fd [2*ceil(F/128), ceil(D/128)] float32 (gate blocks, then up),
    w2_DF [D, F] float8_e4m3fn, w2_sinv_df [ceil(D/128), ceil(F/128)] float32.
    """

    w13_FD: torch.Tensor
    w13_sinv_fd: torch.Tensor
    w2_DF: torch.Tensor
    w2_sinv_df: torch.Tensor


class Checkpoint:
    """An open model folder. Use as a context manager; `config` is validated on open."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.load(self.model_dir)
        self.block = self.config.weight_block_size
        self._file_of, self._listed_in = _weight_map(self.model_dir)
        self._handles: dict[Path, object] = {}
        self._check_config_sizes()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name` as stored, after checking its dtype (safetensors names) and shape."""
        path, part = self._slice(name)
        dtype, got = part.get_dtype(), tuple(part.get_shape())
        if dtype not in dtypes:
            raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}, expected {' or '.join(dtypes)}")
        if got != tuple(shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
        return part[:]

    def read_weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A non-expert tensor in `dtype`: float tensors are cast, FP8 ones dequantised with their scales."""
        _, part = self._slice(name)
        if part.get_dtype() == FP8:
            return dequant_weight_blocks_ref(*self.read_fp8(name, shape), self.block, dtype)
        return self.read(name, FLOAT_DTYPES + (FP8,), shape).to(dtype)

    def read_fp8(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight float8_e4m3fn `shape`, weight_scale_inv float32 [ceil(N/128), ceil(K/128)])."""
        weight = self.read(name, (FP8,), shape)
        if not self.has(scale_name(name)):
            path, _ = self._slice(name)
            raise ValueError(f"{path}: tensor '{scale_name(name)}' is missing (FP8 weight '{name}' needs its block scales)")
        want = scale_shape(tuple(shape), self.block)
        path, part = self._slice(scale_name(name))
        if tuple(part.get_shape()) != want:
            raise ValueError(
                f"{path}: tensor '{scale_name(name)}' has shape {list(part.get_shape())}, expected {list(want)} "
                f"(one scale per {self.block[0]}x{self.block[1]} block of a {list(shape)} weight)"
            )
        return weight, self.read(scale_name(name), ("F32",), want)

    def read_expert(self, layer: int, expert: int) -> ExpertWeights:
        """Routed expert `expert` of model layer `layer`, as stored (no dequantisation)."""
        F, D = self.config.moe_intermediate_size, self.config.hidden_size
        gate, gate_s = self.read_fp8(expert_tensor(layer, expert, "gate_proj"), (F, D))
        up, up_s = self.read_fp8(expert_tensor(layer, expert, "up_proj"), (F, D))
        down, down_s = self.read_fp8(expert_tensor(layer, expert, "down_proj"), (D, F))
        return ExpertWeights(torch.cat([gate, up]), torch.cat([gate_s, up_s]), down, down_s)

    def load_module(self, module: torch.nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        """Fill every tensor of `module.state_dict()` from the tensor of the same name (with `prefix`)."""
        with torch.no_grad():
            for name, target in module.state_dict().items():
                full = prefix + name
                if any(full.startswith(s) for s in skip):
                    continue
                target.copy_(self.read_weight(full, tuple(target.shape), target.dtype))

    def _check_config_sizes(self) -> None:
        """The sizes config.json claims must be those of the stored tensors (header shapes only, nothing
        is read): the model allocates from the config, so a config of another model, or one claiming
        absurd sizes, has to fail here rather than in a multi-gigabyte allocation."""
        c = self.config
        D, H, F, moe = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size, c.first_k_dense_replace
        qk, attn = c.qk_nope_head_dim + c.qk_rope_head_dim, f"model.layers.{c.num_hidden_layers - 1}.self_attn"
        expected = {
            "model.embed_tokens.weight": ((c.vocab_size, D), "vocab_size, hidden_size"),
            f"{attn}.o_proj.weight": ((D, H * c.v_head_dim), "num_hidden_layers, num_attention_heads, v_head_dim"),
            f"{attn}.kv_a_proj_with_mqa.weight": ((c.kv_lora_rank + c.qk_rope_head_dim, D), "kv_lora_rank, qk_rope_head_dim"),
            f"{attn}.kv_b_proj.weight": ((H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                                           "num_attention_heads, qk_nope_head_dim, v_head_dim, kv_lora_rank"),
            f"model.layers.{moe}.mlp.gate.weight": ((c.n_routed_experts, D), "n_routed_experts"),
            expert_tensor(moe, c.n_routed_experts - 1, "down_proj"): ((D, F), "n_routed_experts, moe_intermediate_size"),
        }
        if c.q_lora_rank is None:
            expected[f"{attn}.q_proj.weight"] = ((H * qk, D), "q_lora_rank (null), qk head dims")
        else:
            expected[f"{attn}.q_b_proj.weight"] = ((H * qk, c.q_lora_rank), "q_lora_rank, qk head dims")
        if moe > 0:
            expected["model.layers.0.mlp.down_proj.weight"] = ((D, c.intermediate_size), "intermediate_size")
        if c.n_shared_experts:
            expected[f"model.layers.{moe}.mlp.shared_experts.down_proj.weight"] = (
                (D, F * c.n_shared_experts), "n_shared_experts")
        for name, (shape, fields) in expected.items():
            if not self.has(name):
                raise ValueError(f"{self._listed_in}: tensor '{name}' is missing, so {c.source} does not describe "
                                 f"these weights (check {fields})")
            path, part = self._slice(name)
            if tuple(part.get_shape()) != shape:
                raise ValueError(f"{path}: tensor '{name}' has shape {list(part.get_shape())}, expected {list(shape)} "
                                 f"from {c.source} ({fields})")

    def _slice(self, name: str):
        path = self._file_of.get(name)
        if path is None:
            raise ValueError(f"{self._listed_in}: tensor '{name}' is missing")
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path}: cannot read safetensors file ({exc})") from None
        try:
            return path, self._handles[path].get_slice(name)
        except SafetensorError:
            raise ValueError(f"{path}: tensor '{name}' is missing (listed in {INDEX_FILE})") from None


def _weight_map(model_dir: Path) -> tuple[dict[str, Path], Path]:
    """tensor name -> file, from the index when there is one, else from the headers of *.safetensors."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' object ({exc!r})") from None
        for name, f in weight_map.items():
            # Shards are plain file names beside the index; anything else could point outside the folder.
            if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                raise ValueError(f"{index}: tensor {name!r} maps to {f!r}, not a file name in {model_dir}")
        files = {f: model_dir / f for f in set(weight_map.values())}
        for f, path in files.items():
            if not path.exists():
                raise ValueError(f"{index}: lists file {f!r}, which does not exist")
        return {name: files[f] for name, f in weight_map.items()}, index
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise ValueError(f"{model_dir}: no .safetensors files")
    file_of = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                file_of.update(dict.fromkeys(f.keys(), path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: cannot read safetensors file ({exc})") from None
    return file_of, paths[0] if len(paths) == 1 else model_dir
