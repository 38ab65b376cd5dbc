"""Hugging Face profiler: tiny random-weight models of every supported family, checked against routing
recomputed here from the routers' input hidden states, one unpadded prompt at a time without a KV cache."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from moeplace.profiler.hf import ENGINE, profile_hf_model
from moeplace.profiler.prompts import read_prompt_file
from moeplace.trace import load_native_trace, save_trace

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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def reference_topk(config, router: torch.nn.Module, logits_SE: torch.Tensor) -> torch.Tensor:
    """[S, K] experts each token goes to, written out here from the model's published routing rule."""
    K, (S, E) = config.num_experts_per_tok, logits_SE.shape
    logits_SE = logits_SE.float()
    if config.model_type == "deepseek_v3":  # sigmoid + bias; groups by their top-2 sum; top-k in kept groups
        scores_SE = logits_SE.sigmoid() + router.e_score_correction_bias
        G = config.n_group
        group_SG = scores_SE.view(S, G, E // G).topk(2, dim=-1).values.sum(-1)
        kept_SG = torch.zeros(S, G, dtype=torch.bool).scatter(1, group_SG.topk(config.topk_group, -1).indices, True)
        scores_SE = scores_SE.masked_fill(~kept_SG.repeat_interleave(E // G, dim=1), float("-inf"))
        return scores_SE.topk(K, dim=-1).indices
    if config.model_type == "deepseek_v2":  # softmax; groups by their max; top-k in kept groups
        probs_SE = logits_SE.softmax(-1)
        G = config.n_group
        group_SG = probs_SE.view(S, G, E // G).max(-1).values
        kept_SG = torch.zeros(S, G, dtype=torch.bool).scatter(1, group_SG.topk(config.topk_group, -1).indices, True)
        return probs_SE.masked_fill(~kept_SG.repeat_interleave(E // G, dim=1), 0.0).topk(K, dim=-1).indices
    if config.model_type == "gpt_oss":  # top-k of the biased logits (the bias is inside router_logits)
        return logits_SE.topk(K, dim=-1).indices
    return logits_SE.softmax(-1).topk(K, dim=-1).indices


def reference_routing(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int) -> list[np.ndarray]:
    """Per prompt, [tokens, L, K] top-k ids of every token a serving engine routes for it.

    The routers' input hidden states are captured (forward pre-hooks); logits and top-k are computed
    here. Every prompt runs alone (no padding) and each greedy step reruns the whole sequence (no cache).
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    routers = list(routers_of(model).values())
    inputs: list[torch.Tensor] = []
    hooks = [r.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for r in routers]
    result = []
    with torch.inference_mode():
        for ids in prompt_ids:
            ids = list(ids)
            for _ in range(max_tokens - 1):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            inputs.clear()
            model(torch.tensor([ids]))
            assert len(inputs) == len(routers)
            per_layer = [reference_topk(model.config, r, router_logits(r, x)) for r, x in zip(routers, inputs)]
            result.append(torch.stack(per_layer, dim=1).numpy())
    for hook in hooks:
        hook.remove()
    return result


def router_logits(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[S, E] logits of the router's linear map (DeepSeek computes it in float32; GPT-OSS adds a bias)."""
    hidden_SD = hidden.reshape(-1, router.weight.shape[1]).float()
    logits_SE = hidden_SD @ router.weight.float().T
    bias = getattr(router, "bias", None)
    return logits_SE if bias is None else logits_SE + bias.float()


def bincount_LE(ids_TLK: np.ndarray, E: int) -> np.ndarray:
    return np.stack([np.bincount(ids_TLK[:, l].ravel(), minlength=E) for l in range(ids_TLK.shape[1])])


def token_rows(ids_TLK: np.ndarray) -> Counter:
    """Multiset of tokens' selections, each layer's ids sorted (DeepSeek's top-k is unsorted)."""
    return Counter(tuple(np.sort(ids_TLK[t], axis=-1).ravel()) for t in range(len(ids_TLK)))


def byte_ids(prompt: str) -> list[int]:
    return list(prompt.encode())


# --- counts against the routing recomputed from the router logits ---------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_match_recomputed_routing(family, tiny_model):
    model_dir = tiny_model(family)
    calls = []
    trace = profile_hf_model(model_dir, PROMPTS, max_tokens=3, batch_size=2, sample_rate=1.0,
                             progress=lambda done, total: calls.append((done, total)))
    ref = reference_routing(model_dir, [byte_ids(p) for p in PROMPTS], max_tokens=3)

    layers = FAMILIES[family][1]
    assert trace.layers.tolist() == layers
    assert trace.num_windows == 4 and calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert json.loads(trace.metadata["window_names"]) == ["prompts 0-1", "prompts 2-3", "prompts 4-5", "prompts 6-6"]
    for w in range(4):  # window w = prompts 2w, 2w+1; padding routes nothing
        ids_TLK = np.concatenate(ref[2 * w : 2 * w + 2])
        assert trace.tokens_W[w] == len(ids_TLK) == sum(len(p) + 2 for p in PROMPTS[2 * w : 2 * w + 2])
        np.testing.assert_array_equal(trace.counts_WLE[w], bincount_LE(ids_TLK, trace.num_experts))
        np.testing.assert_array_equal(trace.counts_WLE[w].sum(-1), trace.tokens_W[w] * trace.top_k)
    assert token_rows(trace.topk_ids_TLK) == token_rows(np.concatenate(ref))
    assert (trace.n_group, trace.topk_group) == ((4, 2) if family.startswith("deepseek") else (1, 1))
    assert trace.num_model_layers == FAMILIES[family][0]().num_hidden_layers
    assert trace.metadata["engine"] == ENGINE and trace.metadata["model_type"] == family
    assert trace.metadata["prompts"] == str(len(PROMPTS)) and "UTF-8 bytes" in trace.metadata["tokenizer"]
    assert (np.diff(trace.time_W) >= 0).all()


def test_prefill_only_counts_do_not_depend_on_batching(tiny_model):
    model_dir = tiny_model("qwen3_moe")
    one = profile_hf_model(model_dir, PROMPTS, batch_size=1)
    all_ = profile_hf_model(model_dir, PROMPTS, batch_size=len(PROMPTS))
    ref = reference_routing(model_dir, [byte_ids(p) for p in PROMPTS], max_tokens=0)
    assert one.num_windows == len(PROMPTS) and all_.num_windows == 1
    np.testing.assert_array_equal(one.counts_WLE.sum(0), all_.counts_WLE[0])
    np.testing.assert_array_equal(all_.counts_WLE[0], bincount_LE(np.concatenate(ref), 8))
    assert one.tokens_W.tolist() == [len(p) for p in PROMPTS] and one.topk_ids_TLK is None


def test_sampled_tokens_are_a_reproducible_subset(tiny_model, tmp_path):
    model_dir = tiny_model("mixtral")
    trace = profile_hf_model(model_dir, PROMPTS, max_tokens=2, sample_rate=0.3)
    again = profile_hf_model(model_dir, PROMPTS, max_tokens=2, sample_rate=0.3)
    ref = token_rows(np.concatenate(reference_routing(model_dir, [byte_ids(p) for p in PROMPTS], max_tokens=2)))
    total = sum(len(p) + 1 for p in PROMPTS)
    assert 0.15 * total < len(trace.topk_ids_TLK) < 0.45 * total
    assert not token_rows(trace.topk_ids_TLK) - ref  # every sampled row is a row the model routed
    np.testing.assert_array_equal(trace.topk_ids_TLK, again.topk_ids_TLK)
    assert trace.metadata["topk_sample_rate"] == "0.3"
    save_trace(trace, tmp_path / "t.safetensors")
    loaded = load_native_trace(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(loaded.counts_WLE, trace.counts_WLE)
    np.testing.assert_array_equal(loaded.topk_ids_TLK, trace.topk_ids_TLK)


def test_tokenizer_in_the_model_directory_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = save_tiny_model("olmoe", tmp_path / "olmoe")
    words = sorted(set(" ".join(PROMPTS).split()))
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>").save_pretrained(model_dir)

    trace = profile_hf_model(model_dir, PROMPTS, batch_size=len(PROMPTS))
    word_ids = [[vocab[w] for w in p.split()] for p in PROMPTS]
    ref = reference_routing(model_dir, word_ids, max_tokens=0)
    assert trace.tokens_W.tolist() == [sum(len(p.split()) for p in PROMPTS)]
    np.testing.assert_array_equal(trace.counts_WLE[0], bincount_LE(np.concatenate(ref), 16))
    assert trace.metadata["tokenizer"].endswith("from the model directory")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_cuda_profile_equals_cpu_profile(family, tiny_model):
    model_dir = tiny_model(family)
    cpu = profile_hf_model(model_dir, PROMPTS, max_tokens=3, batch_size=3, sample_rate=1.0)
    cuda = profile_hf_model(model_dir, PROMPTS, max_tokens=3, batch_size=3, sample_rate=1.0, device="cuda")
    np.testing.assert_array_equal(cuda.counts_WLE, cpu.counts_WLE)
    assert token_rows(cuda.topk_ids_TLK) == token_rows(cpu.topk_ids_TLK)
    assert cuda.metadata["device"] == "cuda"


# --- bad input ------------------------------------------------------------------------------------------


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        profile_hf_model(tmp_path / "missing", ["hi"])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ": no config.json"):
        profile_hf_model(tmp_path, ["hi"])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: transformers cannot read it"):
        profile_hf_model(tmp_path, ["hi"])


def test_dense_and_unsupported_models_are_refused(tmp_path):
    LlamaConfig(**COMMON, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"llama is not a Mixture-of-Experts model \(model_type llama\)"):
        profile_hf_model(tmp_path / "llama", ["hi"])
    PhimoeConfig(**COMMON, num_hidden_layers=1).save_pretrained(tmp_path / "phimoe")
    with pytest.raises(ValueError, match="model_type phimoe is a Mixture-of-Experts model .* not support"):
        profile_hf_model(tmp_path / "phimoe", ["hi"])
    dense = Qwen3MoeConfig(**COMMON, head_dim=16, num_hidden_layers=2, mlp_only_layers=[0, 1], num_experts=8)
    AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "all-dense")
    with pytest.raises(ValueError, match=r"is not a Mixture-of-Experts model \(model_type qwen3_moe, no MoE layers\)"):
        profile_hf_model(tmp_path / "all-dense", ["hi"])
    FAMILIES["mixtral"][0]().save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ValueError, match="no-weights: transformers cannot load the model"):
        profile_hf_model(tmp_path / "no-weights", ["hi"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": []}, "no prompts to profile"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \[0, 1\], got 1.5"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"max_tokens": -1}, "max_tokens must be an integer >= 0, got -1"),
    ({"device": "gpu0"}, "device 'gpu0' is not a torch device"),
    ({"prompts": ["y" * 60], "max_tokens": 8}, "prompt 0: 60 tokens \\+ max_tokens 8 exceed .* 64"),
])
def test_bad_arguments(kwargs, message, tiny_model):
    kwargs = {"prompts": ["hi"], **kwargs}
    with pytest.raises(ValueError, match=message):
        profile_hf_model(tiny_model("mixtral"), **kwargs)


# --- prompt files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("p.txt", "first prompt\n\n  second, with spaces  \r\nthird\n"),
    ("p.json", json.dumps(["first prompt", {"prompt": "  second, with spaces  "}, {"text": "third"}])),
    ("p.jsonl", '{"prompt": "first prompt"}\n\n"  second, with spaces  "\n{"text": "third", "id": 3}\n'),
])
def test_prompt_files(name, text, tmp_path):
    (tmp_path / name).write_text(text)
    assert read_prompt_file(tmp_path / name) == ["first prompt", "  second, with spaces  ", "third"]


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("p.txt", "", "no prompts, the file is empty"),
    ("p.txt", " \n\n\t\n", "no prompts, the file is empty"),
    ("p.json", "[]", "no prompts, the JSON list is empty"),
    ("p.json", '[\n"a",\n"b" "c"\n]', "line 3: not valid JSON"),
    ("p.json", '{"prompt": "a"}', "expected a JSON list of prompts, got a JSON dict"),
    ("p.json", '["a", 7]', "item 1: prompt must be a string, got int"),
    ("p.json", '["a", {"question": "b"}]', "item 1: object has no \"prompt\" or \"text\" field"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', "line 2: prompt is empty"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: not valid JSON"),
])
def test_bad_prompt_files(name, text, problem, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(problem)):
        read_prompt_file(path)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="prompt file not found"):
        read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8 text"):
        read_prompt_file(tmp_path / "bin.txt")


def test_cli_profile_hf_model(tmp_path):
    """`moeplace profile --hf-model DIR --prompts FILE -o trace` writes a trace; a dense model is one line + exit 1."""
    from typer.testing import CliRunner

    from moeplace.cli import app
    from moeplace.readers import load_trace

    model_dir = save_tiny_model("mixtral", tmp_path / "mixtral")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello experts\nthe GPU is hot\n")
    out = tmp_path / "trace.safetensors"
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["profile", "--hf-model", str(model_dir), "--prompts", str(prompts), "-o", str(out)])
    assert result.exit_code == 0, result.output
    trace = load_trace(out)
    assert trace.metadata["engine"] == "transformers (offline)" and trace.counts_WLE.sum() > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = runner.invoke(app, ["profile", "--hf-model", str(model_dir), "--prompts", str(empty), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "empty.txt" in bad.output
    assert not (tmp_path / "x").exists()
