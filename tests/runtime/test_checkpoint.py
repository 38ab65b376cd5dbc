"""Checkpoint reading: bad checkpoints fail with the file and tensor named; a rank reads only its experts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeplace.placement import trivial_placement
from moeplace.runtime.checkpoint import Checkpoint, expert_tensor
from moeplace.runtime.comm import Comm
from moeplace.runtime.model import EPModel, build_dense_model
from moeplace.runtime.moe import EPMoE
from moeplace.topology import Topology

CPU = torch.device("cpu")
UP5 = expert_tensor(2, 5, "up_proj")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(UP5), f"tensor '{UP5}' is missing"),
        (lambda t: t.update({UP5: t[UP5].bfloat16()}), f"tensor '{UP5}' has dtype BF16, expected F8_E4M3"),
        (lambda t: t.update({UP5: t[UP5][:64]}), f"tensor '{UP5}' has shape [64, 256], expected [128, 256]"),
        (lambda t: t.pop(UP5 + "_scale_inv"), f"tensor '{UP5}_scale_inv' is missing (FP8 weight '{UP5}' needs its block scales)"),
        (lambda t: t.update({UP5 + "_scale_inv": torch.ones(2, 2)}),
         f"tensor '{UP5}_scale_inv' has shape [2, 2], expected [1, 2] (one scale per 128x128 block of a [128, 256] weight)"),
        (lambda t: t.update({UP5 + "_scale_inv": torch.ones(1, 2, dtype=torch.bfloat16)}),
         f"tensor '{UP5}_scale_inv' has dtype BF16, expected F32"),
    ],
)
def test_bad_expert_tensor(tiny_variant, edit, message):
    model_dir = tiny_variant(edit, "bad")
    with Checkpoint(model_dir) as ckpt, pytest.raises(ValueError) as err:
        ckpt.read_expert(2, 5)
    assert str(err.value) == f"{model_dir / 'model.safetensors'}: {message}"
    with pytest.raises(ValueError, match="model.safetensors: tensor"):  # and the whole model refuses to load
        EPModel.load(model_dir, None, group=None, device=CPU)


def test_bad_dense_tensor(tiny_variant):
    name = "model.embed_tokens.weight"
    model_dir = tiny_variant(lambda t: t.update({name: t[name][:258]}), "bad")
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{name}' has shape \[258, 256\], expected \[259, 256\]"):
        EPModel.load(model_dir, None, group=None, device=CPU)


def test_sharded_checkpoint_with_index(tiny_dir, tmp_path):
    tensors = load_file(tiny_dir / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, out / file)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint(out) as ckpt:
        assert torch.equal(ckpt.read_expert(2, 5).w13_FD.view(torch.uint8),
                           Checkpoint(tiny_dir).read_expert(2, 5).w13_FD.view(torch.uint8))
        with pytest.raises(ValueError, match=r"model.safetensors.index.json: tensor 'nope' is missing"):
            ckpt.read("nope", ("F32",), (1,))
    weight_map[UP5] = "model-00003-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="index.json: lists file 'model-00003-of-00002.safetensors', which does not exist"):
        Checkpoint(out)


def test_unreadable_files(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: no .safetensors files"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="config.json: not a DeepSeek-V3-family model"):
        EPModel.load(tmp_path, None, group=None, device=CPU)


def test_rank_reads_only_the_experts_of_its_slots(tiny_dir, monkeypatch):
    read = []
    original = Checkpoint.read

    def spy(self, name, dtypes, shape):
        read.append(name)
        return original(self, name, dtypes, shape)

    monkeypatch.setattr(Checkpoint, "read", spy)
    with Checkpoint(tiny_dir) as ckpt:
        config = ckpt.config
        placement = trivial_placement(64, Topology(2, 2, 32), np.array(config.moe_layers), 4)
        _, hf_config = build_dense_model(config, CPU, torch.float32)
        moe = EPMoE(config, hf_config, 2, 1, placement, Comm(None, rank=1, world_size=2), CPU, torch.float32)
        moe.load_slots(ckpt)
    experts = {int(n.split(".")[5]) for n in read if ".experts." in n}
    assert experts == set(range(32, 64))
    assert all(n.startswith("model.layers.2.mlp.experts.") for n in read)
    assert moe.slot_experts_S.tolist() == list(range(32, 64))
    with Checkpoint(tiny_dir) as ckpt:
        stored = ckpt.read_expert(2, 40)
    assert torch.equal(moe.w2_SDF[8].view(torch.uint8), stored.w2_DF.view(torch.uint8))
    assert torch.equal(moe.w13_sinv_Sfd[8], stored.w13_sinv_fd)
