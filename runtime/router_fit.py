"""Fit a model folder's router biases so each MoE layer's expert popularity follows a target.

Layer by layer, on the model's own hidden states: calibration text runs through the model up to the
MoE layer being fitted; earlier MoE layers replay the outputs they gave on that text with their fitted
biases, so one layer's experts are in memory at a time (11.3 GB at DeepSeek-V3 shapes). The layer's
`e_score_correction_bias` moves until its share of (token, expert) assignments per expert matches the
target on the fitting text; then the layer runs with that routing, and its output is kept for the
layers after it. Popularity is measured on three texts of `sequences` x 128 bytes each:
  fit       English-like words (`calibration_text`), the text the biases are fitted on;
  held_out  the same kind of text from another seed: what the demo's and benchmarks' clients send;
  ascii     random printable ASCII, a workload shift.
How close the fit gets, and how it generalises with more fitting text, is measured in
benchmarks/BENCHMARKS.md ("Numbers moved out of docstrings"). Used by `moeplace make-model` and for
the embedded tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeplace.runtime.routing import RouterConfig, select_experts

SEQUENCE_BYTES = 128
FIT_SEED, HELD_OUT_SEED, ASCII_SEED = 1234, 4321, 99
# Words of the calibration text: common English, some of this field's jargon, code and numbers.
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been if more when will would who so no "
    "out up into do time only can two new may other these about than first also over after some like "
    "most then very made what where just through long years three model expert token tokens GPU GPUs "
    "network layer weights data route routing load balance node nodes step batch memory fast slow "
    "def return import for x y self = ( ) [ ] : , ; 0 1 2 8 16 64 128 256 2024 3.14 42 % + - * /"
).split()


def calibration_text(seed: int, num_bytes: int) -> str:
    """English-like text from WORDS: sentences of 4-14 words, capitalised, with punctuation."""
    rng = np.random.default_rng(seed)
    sentences, size = [], 0
    while size < num_bytes:
        words = list(rng.choice(WORDS, size=int(rng.integers(4, 15))))
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + str(rng.choice([".", ".", ".", "?", "!", ":"]))
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)[:num_bytes]


def calibration_ids(sequences: int) -> dict[str, torch.Tensor]:
    """{set name: input ids [sequences, 128] int64} for the fit, held_out and ascii texts."""
    from moeplace.runtime.tokenizer import ByteTokenizer

    tok, size = ByteTokenizer(), sequences * SEQUENCE_BYTES
    ascii_text = "".join(map(chr, np.random.default_rng(ASCII_SEED).integers(32, 127, size)))
    texts = {"fit": calibration_text(FIT_SEED, size), "held_out": calibration_text(HELD_OUT_SEED, size),
             "ascii": ascii_text}
    return {name: torch.tensor(tok.encode(text, add_bos=False)).view(sequences, SEQUENCE_BYTES)
            for name, text in texts.items()}


def fit_router_biases(model_dir: Path, targets_LE: np.ndarray, device: torch.device, sequences: int,
                      log: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, dict]:
    """-> (biases_LE [L, E] float32, popularity report): per MoE layer of the model in `model_dir`, the
    correction bias whose routing of the fitting text gives the shares targets_LE [L, E] (rows sum to 1).
    The report holds, per text, each layer's correlation and total variation distance to the target;
    `uniform_tvd`, the distance of uniform popularity; `sampling_tvd`, the distance a perfect fit would
    still show on a text of this size. Whatever biases the checkpoint holds are ignored."""
    from moeplace.placement import trivial_placement
    from moeplace.runtime.checkpoint import Checkpoint
    from moeplace.runtime.comm import Comm
    from moeplace.runtime.model import build_dense_model
    from moeplace.runtime.moe import EPMoE
    from moeplace.topology import Topology

    texts = calibration_ids(sequences)
    ids_BT = torch.cat(list(texts.values())).to(device)
    rows = {name: slice(i * sequences * SEQUENCE_BYTES, (i + 1) * sequences * SEQUENCE_BYTES)
            for i, name in enumerate(texts)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the runtime serves it
    biases, report = [], {name: {"corr": [], "tvd": []} for name in texts}
    with Checkpoint(model_dir) as ckpt, torch.no_grad():
        config = ckpt.config
        E, router = config.n_routed_experts, RouterConfig.from_model(config)
        one_gpu = trivial_placement(E, Topology(1, 1, E), np.array(config.moe_layers), config.num_hidden_layers)
        hf_model, hf_config = build_dense_model(config, device, dtype)
        ckpt.load_module(hf_model)
        for row, layer in enumerate(config.moe_layers):
            moe = EPMoE(config, hf_config, layer, row, one_gpu, Comm.of(None), device, dtype)
            ckpt.load_module(moe, prefix=f"model.layers.{layer}.mlp.")
            moe.load_slots(ckpt)
            x_BTD = _moe_input(hf_model, layer, ids_BT)
            logits_TE = F.linear(x_BTD.reshape(-1, x_BTD.shape[-1]).float(), moe.gate.weight)
            target_E = torch.as_tensor(targets_LE[row], dtype=torch.float32, device=device)
            bias_E = fit_bias(logits_TE[rows["fit"]], target_E, router)
            moe.gate.e_score_correction_bias.copy_(bias_E)
            ids_TK, _ = select_experts(logits_TE, bias_E, router)
            for name, span in rows.items():
                corr, tvd = distance(shares(ids_TK[span], E), targets_LE[row])
                report[name]["corr"].append(corr)
                report[name]["tvd"].append(tvd)
            log(f"layer {layer}: router bias fitted (held-out text: correlation {report['held_out']['corr'][-1]:.3f})")
            if row + 1 < len(config.moe_layers):
                hf_model.model.layers[layer].mlp = _Replay(moe.forward_shared(x_BTD, None).y_TD.view_as(x_BTD))
            biases.append(bias_E.cpu().numpy())
            del moe
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next layer's 256 experts need the memory this one held
    report["uniform_tvd"] = [distance(np.full(E, 1 / E), t)[1] for t in targets_LE]
    # A sample of as many assignments as one text makes, drawn from the target itself.
    draws = sequences * SEQUENCE_BYTES * router.top_k
    rng = np.random.default_rng(0)
    report["sampling_tvd"] = [distance(rng.multinomial(draws, t / t.sum()) / draws, t)[1] for t in targets_LE]
    report = {k: _rounded(v) for k, v in report.items()}
    return np.stack(biases).astype(np.float32), report


def fit_bias(logits_TE: torch.Tensor, target_E: torch.Tensor, router: RouterConfig, steps: int = 120) -> torch.Tensor:
    """bias_E float32 [E] such that routing logits_TE [T, E] with it gives about the shares target_E [E]."""
    bias_E = torch.zeros(logits_TE.shape[1], device=logits_TE.device)
    for step in range(steps):
        ids_TK, _ = select_experts(logits_TE, bias_E, router)
        share_E = torch.bincount(ids_TK.reshape(-1), minlength=len(bias_E)) / ids_TK.numel()
        # Raise under-used experts, lower over-used ones, relative to their target; decaying steps.
        bias_E += 0.05 * (0.98**step) * (target_E - share_E) / target_E.mean()
    return torch.round(bias_E * 4096) / 4096  # coarse grid: stable under last-bit float differences


def shares(ids_TK: torch.Tensor, num_experts: int) -> np.ndarray:
    """[E] float64 share of the (token, expert) assignments of ids_TK [T, K] that each expert took."""
    counts = torch.bincount(ids_TK.reshape(-1), minlength=num_experts).cpu().numpy().astype(np.float64)
    return counts / counts.sum()


def distance(shares_E: np.ndarray, target_E: np.ndarray) -> tuple[float, float]:
    """(correlation, total variation distance) of two popularity vectors, each summing to 1."""
    corr = float(np.corrcoef(shares_E, target_E)[0, 1]) if shares_E.std() > 0 else 0.0
    return corr, float(0.5 * np.abs(shares_E - target_E).sum())


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return [round(v, 4) for v in value]


class _Stop(Exception):
    """Raised by `_Capture`: the layers after the one being fitted need not run."""


class _Capture(nn.Module):
    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        self.hidden_BTD = hidden_BTD
        raise _Stop


class _Replay(nn.Module):
    """An MoE layer already fitted: its output on the calibration batch, which is all it is ever given."""

    def __init__(self, out_BTD: torch.Tensor) -> None:
        super().__init__()
        self.out_BTD = out_BTD

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        assert hidden_BTD.shape == self.out_BTD.shape, (tuple(hidden_BTD.shape), tuple(self.out_BTD.shape))
        return self.out_BTD


def _moe_input(hf_model: nn.Module, layer: int, ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states entering MoE layer `layer` when the model reads ids_BT."""
    capture = _Capture()
    hf_model.model.layers[layer].mlp = capture
    try:
        hf_model(input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT), use_cache=False)
    except _Stop:
        pass
    return capture.hidden_BTD
