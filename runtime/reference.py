"""Single-process reference of a checkpoint: the correctness oracle for `EPModel`.

Independent of the EP path wherever it can be: tokens are routed by transformers' own
DeepseekV3TopkRouter (not by routing.py), every expert is dequantised once up front, and the
routed experts are applied token by token, one (token, expert) pair at a time. Shares with EPModel only the
checkpoint reader and the non-MoE transformers modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeplace.runtime.checkpoint import Checkpoint
from moeplace.kernels.fp8 import dequant_weight_blocks_ref
from moeplace.runtime.model import build_dense_model


class ReferenceMoE(nn.Module):
    def __init__(self, ckpt: Checkpoint, hf_config, layer_id: int):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3TopkRouter

        super().__init__()
        config = ckpt.config
        self.gate = DeepseekV3TopkRouter(hf_config)
        self.shared_experts = DeepseekV3MLP(hf_config, config.moe_intermediate_size * config.n_shared_experts)
        Fi = config.moe_intermediate_size
        gate, up, down = [], [], []
        for e in range(config.n_routed_experts):
            w = ckpt.read_expert(layer_id, e)
            f = w.w13_sinv_fd.shape[0] // 2
            gate.append(dequant_weight_blocks_ref(w.w13_FD[:Fi], w.w13_sinv_fd[:f], ckpt.block, torch.float32))
            up.append(dequant_weight_blocks_ref(w.w13_FD[Fi:], w.w13_sinv_fd[f:], ckpt.block, torch.float32))
            down.append(dequant_weight_blocks_ref(w.w2_DF, w.w2_sinv_df, ckpt.block, torch.float32))
        self.register_buffer("gate_EFD", torch.stack(gate), persistent=False)
        self.register_buffer("up_EFD", torch.stack(up), persistent=False)
        self.register_buffer("down_EDF", torch.stack(down), persistent=False)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        _, weights_TK, ids_TK = self.gate(x_TD)
        out_TD = torch.zeros_like(x_TD)
        for t, (experts, weights) in enumerate(zip(ids_TK.tolist(), weights_TK.tolist())):
            x_D = x_TD[t]
            for e, weight in zip(experts, weights):
                h_F = F.silu(self.gate_EFD[e] @ x_D) * (self.up_EFD[e] @ x_D)
                out_TD[t] += weight * (self.down_EDF[e] @ h_F)
        return out_TD.view(hidden_BTD.shape) + self.shared_experts(hidden_BTD)


def load_reference(model_dir: str | Path) -> nn.Module:
    """The whole checkpoint in one process, float32 on CPU: a transformers DeepseekV3ForCausalLM."""
    with Checkpoint(model_dir) as ckpt:
        hf_model, hf_config = build_dense_model(ckpt.config, torch.device("cpu"), torch.float32)
        for layer_id in ckpt.config.moe_layers:
            hf_model.model.layers[layer_id].mlp = ReferenceMoE(ckpt, hf_config, layer_id)
        ckpt.load_module(hf_model)
    return hf_model


def reference_logits(
    model: nn.Module | str | Path, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """logits_BTV float32 of a reference model (or of the checkpoint in a model folder)."""
    if not isinstance(model, nn.Module):
        model = load_reference(model)
    with torch.no_grad():
        return model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits.float()
