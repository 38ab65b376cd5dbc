"""The model's two forward passes, as layer loops over transformers' DeepSeek-V3 modules and EPMoE layers.

Legend: B sequences, T positions, N a step's new tokens (rows), D hidden, V vocabulary, S sequences
whose next token a step samples, L MoE layers, K top-k.

- `recompute`: every position of a right-padded batch, attention by transformers' own
  DeepseekV3Attention (no cache), identical inputs on every rank, the MoE layers splitting the real
  tokens between the ranks (`EPMoE.forward_shared`). The oracle the cached path is checked against.
- `cached_step`: data-parallel attention with the latent KV cache (runtime/kv_cache.py, mla.py):
  each rank brings its own sequences' new tokens (decode tokens, then whole prompts; maybe none) and
  routes all of them (`EPMoE.forward`); all ranks meet in every MoE layer's all-to-all.
The decoder layer's own forward is not called: the MoE layers take and return more than a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplace.runtime import mla
from moeplace.runtime.kv_cache import KVCache, StepPlan
from moeplace.runtime.moe import EPMoE
from moeplace.runtime.moe_output import MoEOutput, Traffic


@dataclass(frozen=True)
class Forward:
    """logits: float32, [B, T, V] (recompute) or [S, V] (a cached step); per MoE layer, ids_L the int64
    [T', K] logical experts of the tokens this rank routed (the same tokens in every layer) and
    traffic_L what its dispatch moved."""

    logits: torch.Tensor
    ids_L: list[torch.Tensor]
    traffic_L: list[Traffic]


def recompute(hf_model, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> Forward:
    """ids_BT, mask_BT int64 [B, T] right-padded (checked by the caller), on the model's device."""
    body = hf_model.model
    x = body.embed_tokens(ids_BT)
    B, T = ids_BT.shape
    cos, sin = body.rotary_emb(x, torch.arange(T, device=x.device)[None].expand(B, T))
    keep_BTT = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() & mask_BT.bool()[:, None, :]
    additive = torch.zeros(B, 1, T, T, dtype=x.dtype, device=x.device)
    additive.masked_fill_(~keep_BTT[:, None], torch.finfo(x.dtype).min)
    moe_L: list[MoEOutput] = []
    for layer in body.layers:
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                      attention_mask=additive)
        x = x + attended
        h = layer.post_attention_layernorm(x)
        if isinstance(layer.mlp, EPMoE):
            moe_L.append(layer.mlp.forward_shared(h, mask_BT.bool()))
            x = x + moe_L[-1].y_TD.view_as(h)
        else:
            x = x + layer.mlp(h)
    return _output(hf_model.lm_head(body.norm(x)).float(), moe_L)


def cached_step(hf_model, cache: KVCache, plan: StepPlan, token_ids_N: torch.Tensor,
                live_N: torch.Tensor | None = None) -> Forward:
    """One step of this rank's sequences: token_ids_N int64 [N] in the plan's row order (N may be 0).
    Writes the new tokens' latents into `cache`; logits [S, V] of each sequence's last row.
    A collective (the MoE layers): every rank calls it in the same step. live_N bool [N], for a
    decode-only step whose N every rank shares (a batch bucket): the MoE layers take the fixed-capacity
    path (`EPMoE.forward_decode`: static shapes, no host sync, what a CUDA graph of the step holds),
    and rows marked False route to no expert."""
    body = hf_model.model
    x = body.embed_tokens(token_ids_N)
    cos, sin = body.rotary_emb(x[None], plan.positions_N[None])
    moe_L: list[MoEOutput] = []
    for i, layer in enumerate(body.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos[0], sin[0], cache.latent_LNC[i], plan)
        h = layer.post_attention_layernorm(x)
        if isinstance(layer.mlp, EPMoE):
            moe_L.append(layer.mlp(h) if live_N is None else layer.mlp.forward_decode(h, live_N))
            x = x + moe_L[-1].y_TD
        else:
            x = x + layer.mlp(h)
    return _output(hf_model.lm_head(body.norm(x[plan.last_S])).float(), moe_L)


def _output(logits: torch.Tensor, moe_L: list[MoEOutput]) -> Forward:
    return Forward(logits, [m.ids_TK for m in moe_L], [m.traffic for m in moe_L])


def _attention(attn, h_ND: torch.Tensor, cos_Nr, sin_Nr, latent_NC: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """One layer's attention output [N, D]: new latents into the cache, then decode rows (absorbed, from
    the cache) and prefill rows (expanded, from the prompt's own latents)."""
    projected = mla.project(attn, h_ND, cos_Nr, sin_Nr)
    latent_NC.index_copy_(0, plan.write_N, projected.latent_NC)
    Bd, parts = plan.num_decode, []
    if Bd:
        parts.append(mla.decode(attn, projected.q_NHQ[:Bd], latent_NC[plan.rows_BX], plan.context_B))
    if plan.prefill_lengths:
        parts.append(mla.prefill(attn, projected.q_NHQ[Bd:], projected.latent_NC[Bd:], plan.prefill_lengths))
    if not parts:  # an idle rank: nothing to attend, but its (empty) batch still meets the MoE collectives
        return h_ND
    return attn.o_proj(torch.cat(parts))
