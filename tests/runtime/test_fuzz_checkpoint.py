"""A checkpoint's config.json, index and tensors, fuzzed: each ends in a valid model or a ValueError
naming the file, fast, before anything large is allocated; `moeplace serve` refuses a bad config in
one line. (The other files moeplace reads: tests/test_fuzz_traces.py, test_fuzz_placements.py.)"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import DEEP, FUZZ, library, mutated_bytes, mutated_json, runner, write
from moeplace.cli import app
from moeplace.runtime.checkpoint import Checkpoint, expert_tensor, scale_name
from moeplace.runtime.config import ModelConfig
from moeplace.kernels.fp8 import quant_weight_blocks_ref
from moeplace.runtime.model import EPModel
from moeplace.runtime.tiny import tiny_config


# -- checkpoint: config.json, index, tensors ---------------------------------------------------

def mini_checkpoint_tensors() -> dict[str, torch.Tensor]:
    """The tensors of the tiny model that Checkpoint checks and `read_expert(1, 0)` reads (not the
    whole model: ~0.3 MB to write per example)."""
    c, gen = tiny_config(), torch.Generator().manual_seed(0)
    D, H, F = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    attn = f"model.layers.{c.num_hidden_layers - 1}.self_attn"
    fp8 = {
        f"{attn}.o_proj.weight": (D, H * c.v_head_dim),
        f"{attn}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, D),
        f"{attn}.kv_b_proj.weight": (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        f"{attn}.q_b_proj.weight": (H * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank),
        "model.layers.0.mlp.down_proj.weight": (D, c.intermediate_size),
        "model.layers.1.mlp.shared_experts.down_proj.weight": (D, F),
        expert_tensor(1, c.n_routed_experts - 1, "down_proj"): (D, F),
        **{expert_tensor(1, 0, proj): (F, D) if proj != "down_proj" else (D, F)
           for proj in ("gate_proj", "up_proj", "down_proj")},
    }
    out = {"model.embed_tokens.weight": torch.randn(c.vocab_size, D, generator=gen).bfloat16(),
           "model.layers.1.mlp.gate.weight": torch.randn(c.n_routed_experts, D, generator=gen).bfloat16()}
    for name, shape in fp8.items():
        out[name], out[scale_name(name)] = quant_weight_blocks_ref(torch.randn(*shape, generator=gen), c.weight_block_size)
    return out


@pytest.fixture(scope="module")
def checkpoint_parts() -> dict:
    from safetensors.torch import save

    tensors = mini_checkpoint_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    return {"config": tiny_config().to_dict(), "tensors": tensors,
            "shards": {f: save({n: tensors[n] for n in part}) for f, part in shards.items()},
            "index": {"weight_map": {n: f for f, part in shards.items() for n in part}}}


def read_checkpoint(folder: Path) -> None:
    with Checkpoint(folder) as ckpt:
        ckpt.read_expert(1, 0)
        ckpt.read_weight("model.embed_tokens.weight", (259, 256))


def test_mini_checkpoint_is_valid(checkpoint_parts, tmp_path):
    write_checkpoint(tmp_path, checkpoint_parts)
    read_checkpoint(tmp_path)


def write_checkpoint(folder: Path, parts: dict, config: str | None = None, index: str | None = None,
                     shard: bytes | None = None) -> Path:
    write(folder, "config.json", config if config is not None else json.dumps(parts["config"]))
    write(folder, "model.safetensors.index.json", index if index is not None else json.dumps(parts["index"]))
    for i, (name, data) in enumerate(parts["shards"].items()):
        write(folder, name, shard if shard is not None and i == 1 else data)
    return folder


@FUZZ
@given(data=st.data())
def test_model_config_fuzzed(checkpoint_parts, data):
    """config.json: ValueError, or a config that transformers accepts too."""
    text = data.draw(mutated_json(checkpoint_parts["config"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "config.json", text)
        config = library("model config.json", lambda: ModelConfig.load(path.parent))
        if config is not None:
            library("model config.json", config.to_hf)


@FUZZ
@given(data=st.data())
def test_checkpoint_fuzzed(checkpoint_parts, data):
    """Index and tensors (names, dtypes, shapes, bytes) of a sharded checkpoint, and its config's sizes."""
    config, index, shard = None, None, None
    op = data.draw(st.sampled_from(["index", "shard bytes", "tensor", "config size"]))
    if op == "index":
        index = data.draw(mutated_json(checkpoint_parts["index"]) | st.just(json.dumps({"weight_map": {"x": "../x"}})))
    elif op == "shard bytes":
        good = next(iter(reversed(checkpoint_parts["shards"].values())))
        shard = data.draw(mutated_bytes(good, hot=8 + int.from_bytes(good[:8], "little")))
    elif op == "tensor":
        from safetensors.torch import save

        tensors = dict(checkpoint_parts["tensors"])
        name = data.draw(st.sampled_from(sorted(tensors)))
        change = data.draw(st.sampled_from(["drop", "bf16", "f32", "short", "transpose", "scalar"]))
        t = tensors.pop(name)
        if change != "drop":
            tensors[name] = {"bf16": lambda: t.float().bfloat16(), "f32": lambda: t.float(), "short": lambda: t[:1],
                             "transpose": lambda: t.T.contiguous(), "scalar": lambda: t.flatten()[:1].reshape(())}[change]()
        names = checkpoint_parts["index"]["weight_map"]
        shards = {f: save({n: tensors[n] for n in tensors if names[n] == f}) for f in checkpoint_parts["shards"]}
        parts = dict(checkpoint_parts, shards=shards)
    else:  # the config claims sizes the tensors do not have: a config of another model, or absurd ones
        field = data.draw(st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                           "num_hidden_layers", "n_routed_experts", "n_shared_experts",
                                           "num_attention_heads", "kv_lora_rank", "q_lora_rank", "v_head_dim",
                                           "qk_rope_head_dim", "qk_nope_head_dim"]))
        value = data.draw(st.sampled_from([2, 3, 16, 1024, 10**5, 10**9, 2**40]))
        config = json.dumps({**checkpoint_parts["config"], field: value})
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp), parts if op == "tensor" else checkpoint_parts, config, index, shard)
        library("checkpoint", lambda: read_checkpoint(folder))


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 10**9), ("vocab_size", 10**9), ("intermediate_size", 10**9),
    ("moe_intermediate_size", 10**8), ("n_routed_experts", 2**20), ("num_attention_heads", 10**6),
])
def test_model_refuses_a_config_claiming_sizes_its_weights_lack(checkpoint_parts, tmp_path, field, value):
    """Before the fix a config.json of 10^9 layers or a 10^9 vocabulary allocated (or tried to) for
    minutes; now the model refuses it from the config and tensor headers alone."""
    config = {**checkpoint_parts["config"], field: value}
    if field == "n_routed_experts":
        config["n_group"] = config["topk_group"] = 1
    folder = write_checkpoint(tmp_path, checkpoint_parts, json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{field}"):
        EPModel.load(folder, None, group=None, device=torch.device("cpu"))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("config_text, problem", [
    (json.dumps({**tiny_config().to_dict(), "num_hidden_layers": 10**9}), "more than the 10000 layers"),
    (json.dumps({**tiny_config().to_dict(), "quantization_config": "fp8"}), "weight_block_size"),
    (DEEP, "cannot read"),
    ('{"model_type": "deepseek_v3", ', "cannot read"),
])
def test_serve_refuses_a_bad_config_in_one_line(tmp_path, monkeypatch, config_text, problem):
    from moeplace.runtime import supervise

    def no_ranks(*_, **__):  # a config that passed the preflight would start a real server here
        raise AssertionError(f"moeplace serve accepted {tmp_path / 'config.json'}")

    monkeypatch.setattr(supervise, "run_ranks", no_ranks)
    write(tmp_path, "config.json", config_text)
    result = runner.invoke(app, ["serve", "--model", str(tmp_path), "--nproc", "2"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr
