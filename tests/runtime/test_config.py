"""ModelConfig: DeepSeek-V3 config.json fields, validated with messages naming the file and field."""

from __future__ import annotations

import json

import pytest

from moeplace.runtime.config import ModelConfig
from moeplace.runtime.tiny import tiny_config

# The routing and shape fields of DeepSeek-V3's published config.json (legacy rope keys).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "hidden_act": "silu", "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_reads_deepseek_v3_config():
    config = ModelConfig.from_dict(DEEPSEEK_V3)
    assert config.moe_layers == list(range(3, 61))
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 10000.0
    assert config.weight_block_size == (128, 128)
    hf = config.to_hf()
    assert hf.n_routed_experts == 256 and hf.topk_group == 4 and hf.rope_parameters["factor"] == 40


def test_round_trip_through_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    assert ModelConfig.load(tmp_path) == tiny_config()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not a DeepSeek-V3-family model"),
        ({"scoring_func": "softmax"}, "field 'scoring_func' is 'softmax'"),
        ({"n_routed_experts": None}, "field 'n_routed_experts' is missing"),
        ({"n_group": 7}, "field 'n_group' (7) must divide n_routed_experts (256)"),
        ({"topk_group": 9}, "field 'topk_group' (9) exceeds n_group (8)"),
        ({"num_experts_per_tok": 200}, "field 'num_experts_per_tok' (200) exceeds the 128 experts"),
        ({"first_k_dense_replace": 61}, "none of the 61 layers is an MoE layer"),
        ({"hidden_size": 0}, "field 'hidden_size' must be a positive integer, got 0"),
        ({"routed_scaling_factor": -1}, "field 'routed_scaling_factor' must be positive"),
        ({"quantization_config": {"weight_block_size": [128]}}, "weight_block_size' must be two positive ints"),
        ({"rope_theta": -1}, "field 'rope_parameters' needs a 'rope_type' and a positive 'rope_theta'"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, change, message):
    data = {**DEEPSEEK_V3, **change}
    data = {k: v for k, v in data.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        ModelConfig.load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'}: ")
    assert message in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ValueError, match="config.json: no such file"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: cannot read"):
        ModelConfig.load(tmp_path)
