"""Tiny random-weight Hugging Face models of every MoE family the HF profiler supports, for its tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)


ROPE = {"rope_type": "default", "rope_theta": 10000.0}


COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_parameters=ROPE)


MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16, moe_intermediate_size=32, n_shared_experts=1)


# family -> (config, model layer ids of its MoE layers)
FAMILIES = {
    "deepseek_v3": (lambda: DeepseekV3Config(**{**COMMON, **MLA}, num_hidden_layers=3, first_k_dense_replace=1,
                                             n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
                    [1, 2]),
    "deepseek_v2": (lambda: DeepseekV2Config(**{**COMMON, **MLA}, num_hidden_layers=3, first_k_dense_replace=1,
                                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             topk_method="group_limited_greedy"),
                    [1, 2]),
    "qwen3_moe": (lambda: Qwen3MoeConfig(**COMMON, head_dim=16, num_hidden_layers=3, mlp_only_layers=[1],
                                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
                  [0, 2]),
    "qwen2_moe": (lambda: Qwen2MoeConfig(**COMMON, num_hidden_layers=4, decoder_sparse_step=2, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32),
                  [1, 3]),
    "mixtral": (lambda: MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
                [0, 1]),
    "olmoe": (lambda: OlmoeConfig(**COMMON, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4),
              [0, 1]),
    "gpt_oss": (lambda: GptOssConfig(**COMMON, head_dim=16, num_hidden_layers=2, num_local_experts=8,
                                     num_experts_per_tok=2, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"]),
                [0, 1]),
}


# Lengths 1 to 30 bytes: batches of 2 pad most rows; the longest pass GPT-OSS's sliding window of 4.
PROMPTS = ["a", "expert placement", "hello moe", "route me to the hottest gpu", "ok", "x" * 30, "tokens"]


def routers_of(model) -> dict[int, torch.nn.Module]:
    """Layer id -> router module, found by the attribute names the MoE blocks use (dense MLPs have neither)."""
    found = {}
    for i, layer in enumerate(model.model.layers):
        router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
        if router is not None:
            found[i] = router
    return found


def save_tiny_model(family: str, out: Path) -> Path:
    torch.manual_seed(sum(map(ord, family)))
    model = AutoModelForCausalLM.from_config(FAMILIES[family][0]())
    with torch.no_grad():
        for router in routers_of(model).values():
            # Logits of std ~1.6 rather than the init's ~0.2: far fewer near-ties among the experts.
            router.weight.normal_(0.0, 0.2)
            for name in ("e_score_correction_bias", "bias"):
                if getattr(router, name, None) is not None:
                    getattr(router, name).normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out
