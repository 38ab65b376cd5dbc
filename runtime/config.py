"""`ModelConfig`: the fields of a DeepSeek-V3-family `config.json` the runtime uses, validated.

Every check raises `ValueError` naming the config file and the field, so `moeplace serve --model DIR`
can print it as one line. `to_hf()` builds the transformers `DeepseekV3Config` for the non-MoE modules.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from moeplace.checks import MAX_MODEL_LAYERS

# model_type values of checkpoints that use the DeepSeek-V3 architecture unchanged (DeepSeek-V3, R1,
# V3.1 and Kimi-K2 ship "deepseek_v3" / "kimi_k2" with architectures ["DeepseekV3ForCausalLM"]).
DEEPSEEK_V3_ARCHITECTURE = "DeepseekV3ForCausalLM"
DEEPSEEK_V3_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "max_position_embeddings",
)


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # one routed (and per shared) expert
    num_hidden_layers: int
    first_k_dense_replace: int  # layers [0, k) are dense, [k, num_hidden_layers) are MoE
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_parameters: dict
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_interleave: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False
    weight_block_size: tuple[int, int] = (128, 128)
    source: str = field(default="config.json", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        for name in _INT_FIELDS:
            _positive_int(src, name, getattr(self, name))
        for name in ("first_k_dense_replace", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{src}: field '{name}' must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None:
            _positive_int(src, "q_lora_rank", self.q_lora_rank)
        if self.num_hidden_layers > MAX_MODEL_LAYERS:  # the model builds every layer: stop before allocating
            raise ValueError(f"{src}: field 'num_hidden_layers' is {self.num_hidden_layers}, more than the "
                             f"{MAX_MODEL_LAYERS} layers any model has")
        for name in ("norm_topk_prob", "rope_interleave", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{src}: field '{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{src}: field '{name}' must be a non-negative integer or null, got {value!r}")
        if not (_finite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"{src}: field 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if self.first_k_dense_replace >= self.num_hidden_layers:
            raise ValueError(
                f"{src}: field 'first_k_dense_replace' is {self.first_k_dense_replace}, so none of the "
                f"{self.num_hidden_layers} layers is an MoE layer"
            )
        E, G = self.n_routed_experts, self.n_group
        if E % G:
            raise ValueError(f"{src}: field 'n_group' ({G}) must divide n_routed_experts ({E})")
        if self.topk_group > G:
            raise ValueError(f"{src}: field 'topk_group' ({self.topk_group}) exceeds n_group ({G})")
        if G > 1 and E // G < 2:
            # Groups are scored by the sum of their top-2 experts (DeepSeek-V3 reference).
            raise ValueError(f"{src}: field 'n_group' ({G}) leaves fewer than 2 experts per group")
        reachable = self.topk_group * (E // G)
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"{src}: field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the {reachable} "
                f"experts of topk_group={self.topk_group} groups"
            )
        if not (_finite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ValueError(f"{src}: field 'routed_scaling_factor' must be positive, got {self.routed_scaling_factor!r}")
        theta = self.rope_parameters.get("rope_theta") if isinstance(self.rope_parameters, dict) else None
        if not (_finite(theta) and theta > 0 and isinstance(self.rope_parameters.get("rope_type"), str)):
            raise ValueError(f"{src}: field 'rope_parameters' needs a 'rope_type' and a positive 'rope_theta', "
                             f"got {self.rope_parameters!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"{src}: field 'hidden_act' is {self.hidden_act!r}; the runtime computes SiLU experts only")
        block = self.weight_block_size
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
            raise ValueError(f"{src}: field 'quantization_config.weight_block_size' must be two positive ints")

    @property
    def moe_layers(self) -> list[int]:
        """Model layer ids of the MoE layers, in order (the `layers` of a Placement for this model)."""
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @classmethod
    def from_dict(cls, data: object, source: str = "config.json") -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: must hold a JSON object")
        _check_architecture(data, source)
        for name in ("scoring_func", "topk_method"):
            want = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}[name]
            if data.get(name, want) != want:
                raise ValueError(f"{source}: field '{name}' is {data[name]!r}; DeepSeek-V3 routing needs {want!r}")
        required = [n for n in (*_INT_FIELDS, "first_k_dense_replace", "routed_scaling_factor") if n not in data]
        if required:
            raise ValueError(f"{source}: field '{required[0]}' is missing ({len(required)} required field(s) missing)")
        quant = data.get("quantization_config") or {}
        block = quant.get("weight_block_size", (128, 128)) if isinstance(quant, dict) else None
        if not isinstance(block, (list, tuple)):
            raise ValueError(f"{source}: field 'quantization_config.weight_block_size' must be two positive ints")
        kwargs = {name: data[name] for name in ModelConfig.__dataclass_fields__ if name in data and name != "source"}
        kwargs["q_lora_rank"] = data.get("q_lora_rank")
        kwargs["norm_topk_prob"] = data.get("norm_topk_prob", True)
        kwargs["rope_parameters"] = _rope_parameters(data, source)
        kwargs["weight_block_size"] = tuple(block)
        for name in ("bos_token_id", "eos_token_id"):
            value = data.get(name)
            kwargs[name] = value[0] if isinstance(value, list) and value else value
        return cls(**kwargs, source=source)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (is {model_dir} a model folder?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: cannot read ({exc})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        """The config.json this config reads back from (DeepSeek-V3 field names)."""
        out = {name: getattr(self, name) for name in ModelConfig.__dataclass_fields__ if name != "source"}
        del out["weight_block_size"]
        out.update(
            architectures=[DEEPSEEK_V3_ARCHITECTURE], model_type="deepseek_v3", scoring_func="sigmoid",
            topk_method="noaux_tc", num_key_value_heads=self.num_attention_heads,
            quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": list(self.weight_block_size)},
        )
        return out

    def to_hf(self):
        """transformers `DeepseekV3Config` for the attention, norms, embeddings and head."""
        from transformers import DeepseekV3Config
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        names = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                 "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "num_attention_heads",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "max_position_embeddings", "rms_norm_eps", "rope_interleave", "hidden_act", "bos_token_id",
                 "eos_token_id", "tie_word_embeddings")
        # The legacy rope keys: transformers 4 reads them, transformers 5 turns them into rope_parameters.
        scaling = {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}
        extra = {}
        if "num_mtp_layers" in getattr(DeepseekV3Config, "__dataclass_fields__", {}):
            extra["num_mtp_layers"] = 0  # the multi-token-prediction layer is not served
        if scaling["rope_type"] not in ("default", *ROPE_INIT_FUNCTIONS):
            raise ValueError(f"{self.source}: field 'rope_parameters' has rope_type {scaling['rope_type']!r}, "
                             f"which transformers does not know")
        try:
            return DeepseekV3Config(
                **{n: getattr(self, n) for n in names},
                num_key_value_heads=self.num_attention_heads,
                rope_theta=self.rope_parameters["rope_theta"],
                rope_scaling=None if scaling.get("rope_type") == "default" else scaling,
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - transformers' checks raise KeyError, TypeError, its own types
            raise ValueError(f"{self.source}: transformers refuses this config ({exc})") from None


def _check_architecture(data: dict, source: str) -> None:
    architectures = data.get("architectures") or []
    if not isinstance(architectures, list):
        raise ValueError(f"{source}: field 'architectures' must be a list, got {architectures!r}")
    if data.get("model_type") in DEEPSEEK_V3_MODEL_TYPES or DEEPSEEK_V3_ARCHITECTURE in architectures:
        return
    raise ValueError(
        f"{source}: not a DeepSeek-V3-family model (model_type {data.get('model_type')!r}, "
        f"architectures {architectures!r}); expected model_type 'deepseek_v3' or {DEEPSEEK_V3_ARCHITECTURE}"
    )


def _rope_parameters(data: dict, source: str) -> dict:
    """transformers 5 `rope_parameters`, from it directly or from DeepSeek's `rope_theta` + `rope_scaling`."""
    if isinstance(data.get("rope_parameters"), dict):
        return dict(data["rope_parameters"])
    if data.get("rope_parameters") is not None:
        raise ValueError(f"{source}: field 'rope_parameters' must be an object or null")
    scaling = data.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: field 'rope_scaling' must be an object or null")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    return {**scaling, "rope_type": rope_type, "rope_theta": data.get("rope_theta", 10000.0)}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(source: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    return value
