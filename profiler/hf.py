"""Profile a Hugging Face transformers MoE model offline: run prompts through it, count the routing.

`profile_hf_model(model_dir, prompts)` loads a local model, hooks its router modules, runs the
prompts in left-padded batches (prefill, then optionally greedy decoding) and returns a `Trace`
with one window per batch. Dimension letters as in `moeplace.trace`, plus B batch rows, S sequence
positions, N = B·S tokens of one forward.

How the selections are captured — read in transformers 5.24, `models/<family>/modeling_<family>.py`.
In every supported family the MoE block flattens its input to [N, D] (row-major over [B, S]), calls
its router module, which returns `(router_logits, weights, indices)`, and passes `indices` [N, K]
unchanged to its experts. So a forward hook on the router reads the ids the experts really use;
nothing is re-derived, and there is no second copy of a routing rule to drift from the model's:
- DeepSeek-V3 `DeepseekV3TopkRouter` (in `DeepseekV3MoE.gate`): sigmoid scores + the
  `e_score_correction_bias`, groups ranked by the sum of their top-2, `topk_group` of `n_group`
  groups kept, top-k within them; a hook on the block's output could not see the ids at all.
- DeepSeek-V2 `DeepseekV2TopkRouter`: softmax, top-k (`greedy`) or per-group max (`group_limited_greedy`).
- Qwen3-MoE / Qwen2-MoE `Qwen3MoeTopKRouter` / `Qwen2MoeTopKRouter`, Mixtral `MixtralTopKRouter`,
  OLMoE `OlmoeTopKRouter`: softmax over the logits, top-k.
- GPT-OSS `GptOssTopKRouter` (in `GptOssMLP.router`): top-k of the biased logits, softmax after.
Which layers are MoE layers (DeepSeek `first_k_dense_replace`, Qwen `mlp_only_layers` and
`decoder_sparse_step`) is read off the built model: a router's module path names its layer.
The hooks and the batch loop are in `moeplace.profiler.hf_run`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeplace.profiler.hf_run import _RouterTap, _run_batch
from moeplace.trace import Trace

ENGINE = "transformers (offline)"
# model_type -> the router module class whose forward returns (logits, weights, top-k ids).
ROUTERS = {
    "deepseek_v3": "DeepseekV3TopkRouter",
    "deepseek_v2": "DeepseekV2TopkRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "mixtral": "MixtralTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "gpt_oss": "GptOssTopKRouter",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LAYER_IN_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class _Window:
    """What one batch routed: start time, tokens (padding excluded), counts [L, E], sampled ids [T, L, K]."""

    start: float
    tokens: int
    counts_LE: np.ndarray
    sampled_TLK: np.ndarray


def profile_hf_model(
    model_dir: Path,
    prompts: list[str],
    *,
    max_tokens: int = 0,
    device: str = "cpu",
    sample_rate: float = 0.0,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Expert load of the model in `model_dir` on `prompts`: one window per batch of `batch_size`.

    Each prompt is prefilled, then `max_tokens` tokens are generated greedily (no stop at EOS, so
    every prompt generates the same number). As in a serving engine the last generated token is
    never fed back, so a prompt of P tokens routes P + max(max_tokens - 1, 0) tokens; padding
    routes nothing. `sample_rate` in [0, 1] keeps that fraction of tokens' top-k ids (seeded,
    reproducible) in `topk_ids_TLK`. `device`: a torch device ("cpu", "cuda", "cuda:1") that the
    whole model goes to. `progress(batches_done, batches_total)` is called after every batch.
    Prompts are tokenized by the model directory's tokenizer with its default special tokens (BOS),
    as a completions endpoint would; without tokenizer files, they become their UTF-8 bytes modulo
    the vocabulary (noted in metadata "tokenizer"). ValueError for a directory that is not a supported MoE model,
    a prompt too long for the model, and bad arguments.
    """
    model_dir = Path(model_dir)
    _check_arguments(prompts, max_tokens, sample_rate, batch_size)
    # 1. load: config (refusing what is not a supported MoE model), model, routers, tokenizer
    config = _read_config(model_dir)
    model = _load_model(model_dir, config, device)
    routers = _find_routers(model, model_dir)
    encode, tokenizer_note = _encoder(model_dir, config.vocab_size)
    ids = [encode(p) for p in prompts]
    _check_lengths(ids, max_tokens, config, model_dir)

    # 2. run the batches, one window each
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    windows = []
    generator = torch.Generator().manual_seed(0)
    with _RouterTap([r for _, r in routers]) as tap, torch.inference_mode():
        for b, batch in enumerate(batches):
            start = time.time()
            tokens = _run_batch(model, batch, max_tokens, tap, sample_rate, generator)
            windows.append(_Window(start, tokens, *tap.take()))
            if progress is not None:
                progress(b + 1, len(batches))

    # 3. the trace
    n_group, topk_group = _routing_groups(routers[0][1])
    metadata = {
        "engine": ENGINE,
        "model": model_dir.name,
        "model_dir": str(model_dir),
        "model_type": config.model_type,
        "router": ROUTERS[config.model_type],
        "prompts": str(len(prompts)),
        "max_tokens": str(max_tokens),
        "batch_size": str(batch_size),
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_note,
        "window_names": json.dumps([f"prompts {b * batch_size}-{b * batch_size + len(batch) - 1}"
                                    for b, batch in enumerate(batches)]),
    }
    if sample_rate > 0:
        metadata["topk_sample_rate"] = str(sample_rate)
    return Trace(
        counts_WLE=np.stack([w.counts_LE for w in windows]),
        layers=np.array([layer for layer, _ in routers]),
        top_k=int(routers[0][1].top_k),
        topk_ids_TLK=np.concatenate([w.sampled_TLK for w in windows]) if sample_rate > 0 else None,
        tokens_W=np.array([w.tokens for w in windows], dtype=np.float64),
        time_W=np.array([w.start for w in windows]),
        num_model_layers=int(config.num_hidden_layers),
        n_group=n_group,
        topk_group=topk_group,
        metadata=metadata,
        source=str(model_dir),
    )


def _check_arguments(prompts: list[str], max_tokens: int, sample_rate: float, batch_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts to profile")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --- loading ---------------------------------------------------------------------------------


def _read_config(model_dir: Path):
    """The model's transformers config, once it is known to be a supported MoE family."""
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: model directory not found")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json, not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{model_dir / 'config.json'}: transformers cannot read it ({_first_line(exc)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type in ROUTERS:
        return config
    if not any(getattr(config, f, None) for f in _EXPERT_COUNT_FIELDS):
        raise ValueError(f"{model_dir} is not a Mixture-of-Experts model (model_type {model_type})")
    raise ValueError(
        f"{model_dir}: model_type {model_type} is a Mixture-of-Experts model the Hugging Face profiler "
        f"does not support; supported: {', '.join(ROUTERS)}"
    )


def _load_model(model_dir: Path, config, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ValueError(f"{model_dir}: transformers cannot load the model ({_first_line(exc)})") from None
    return model.to(target).eval()


def _find_routers(model: torch.nn.Module, model_dir: Path) -> list[tuple[int, torch.nn.Module]]:
    """(model layer id, router module) of every MoE layer, by layer id; all routers agree on E and K."""
    router_class = ROUTERS[model.config.model_type]
    routers = []
    for name, module in model.named_modules():
        if type(module).__name__ == router_class:
            match = _LAYER_IN_PATH.search(name)
            assert match, f"router {name} is not inside a numbered decoder layer"
            routers.append((int(match.group(1)), module))
    if not routers:  # e.g. a Qwen MoE config whose every layer is in mlp_only_layers
        raise ValueError(
            f"{model_dir} is not a Mixture-of-Experts model (model_type {model.config.model_type}, no MoE layers)"
        )
    routers.sort(key=lambda lr: lr[0])
    shapes = {(r.weight.shape[0], r.top_k) for _, r in routers}
    assert len(shapes) == 1, f"routers disagree on (experts, top_k): {shapes}"
    return routers


def _routing_groups(router: torch.nn.Module) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing: DeepSeek-V3 always, V2 with group_limited_greedy."""
    name = type(router).__name__
    if name == "DeepseekV3TopkRouter" or getattr(router, "topk_method", None) == "group_limited_greedy":
        return int(router.num_group), int(router.topk_group)
    return 1, 1


def _encoder(model_dir: Path, vocab_size: int) -> tuple[Callable[[str], list[int]], str]:
    """A prompt -> token ids function and a note on how prompts were tokenized."""
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        note = (f"none in the model directory: prompts are their UTF-8 bytes modulo the vocabulary "
                f"({vocab_size}), so the routing is not that of real text")
        return (lambda prompt: [b % vocab_size for b in prompt.encode("utf-8")]), note
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{model_dir}: transformers cannot load the tokenizer ({_first_line(exc)})") from None
    return (lambda prompt: list(tokenizer(prompt)["input_ids"])), f"{type(tokenizer).__name__} from the model directory"


def _check_lengths(ids: list[list[int]], max_tokens: int, config, model_dir: Path) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        if max(prompt_ids) >= config.vocab_size:
            raise ValueError(f"prompt {i}: token id {max(prompt_ids)} is outside the model's vocabulary "
                             f"({config.vocab_size}); does the tokenizer belong to {model_dir}?")
        if limit and len(prompt_ids) + max_tokens > limit:
            raise ValueError(f"prompt {i}: {len(prompt_ids)} tokens + max_tokens {max_tokens} exceed the "
                             f"model's max_position_embeddings {limit}")



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
