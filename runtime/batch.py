"""Batches of prompts for `EPModel.forward`: right padding, and a plain greedy loop.

The serving engine batches continuously; `greedy_continue` is the simplest user of the model
(tests, examples): it recomputes the whole batch each step (`EPModel.forward`, no KV cache): the
oracle the serving engine's cached steps are checked against.
"""

from __future__ import annotations

import torch


def pad_right(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids_BT int64, attention_mask_BT int64 with 1 on real tokens), padded on the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(map(len, prompts))
    ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    mask_BT = torch.zeros_like(ids_BT)
    for b, prompt in enumerate(prompts):
        ids_BT[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
        mask_BT[b, : len(prompt)] = 1
    return ids_BT, mask_BT


def greedy_continue(model, prompts: list[list[int]], steps: int, pad_id: int) -> list[list[int]]:
    """`steps` greedy (argmax) tokens after each prompt; `model.forward(ids_BT, mask_BT) -> logits_BTV`.

    A collective when `model` is an EPModel of several ranks: every rank calls it with the same prompts.
    """
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        logits_BTV = model.forward(*pad_right(seqs, pad_id))
        for b, seq in enumerate(seqs):
            seq.append(int(logits_BTV[b, len(seq) - 1].argmax()))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]
