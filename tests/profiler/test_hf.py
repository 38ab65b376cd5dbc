"""Hugging Face profiler: tiny random-weight models of every supported family
(tests/support/hf_tiny_models.py), checked against routing recomputed here from the routers' input hidden
states, one unpadded prompt at a time without a KV cache. What it refuses: test_hf_inputs.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_tiny_models import FAMILIES, PROMPTS, routers_of, save_tiny_model
from moeplace.profiler.hf import ENGINE, profile_hf_model
from moeplace.trace import load_native_trace, save_trace


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
