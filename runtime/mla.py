"""Multi-head latent attention over the latent cache, with transformers' DeepseekV3Attention weights.

Legend: N new tokens of a step, H heads, c = kv_lora_rank, r = qk_rope_head_dim, n = qk_nope_head_dim,
v = v_head_dim, C = c + r, B sequences, X context positions, T prompt positions.

Per token the cache holds latent_C = [RMSNorm(kv_a(x))[:c], rope(kv_a(x)[c:])]. The keys and values
of head h are k_h = [W_UK_h · latent[:c], latent[c:]] and v_h = W_UV_h · latent[:c] with
W_UK_h, W_UV_h the head's rows of kv_b_proj ([n, c] and [v, c]).
- Prefill (`prefill`): the prompt's K/V are expanded from its latents once and attended causally
  with scaled_dot_product_attention: the same sums as transformers' own attention.
- Decode (`decode`): the "absorbed" form of DeepSeek-V3's inference code. q_nope · k_nope =
  (W_UK_h^T q_nope) · latent[:c], so the query is moved into latent space once per token and scored
  against the cached latents directly; the probabilities weight the latents, and W_UV_h maps the
  result to the head's output. No per-head K/V is ever built for the context: a step reads C values
  per cached token and layer. Mathematically equal to the expanded form; in float32 the two differ
  by rounding only (tests/runtime/test_kv_cache.py states the tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Projected:
    """q_NHQ [N, H, n + r] queries (rope part rotated); latent_NC [N, C] what the cache keeps."""

    q_NHQ: torch.Tensor
    latent_NC: torch.Tensor


def project(attn, x_ND: torch.Tensor, cos_Nr: torch.Tensor, sin_Nr: torch.Tensor) -> Projected:
    """Queries and cache latents of tokens x_ND; cos/sin [N, r] of their positions (the model's rotary_emb)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    N, H, n, r = x_ND.shape[0], attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    q = attn.q_proj(x_ND) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_ND)))
    q_NHQ = q.view(N, H, n + r)
    kv_NC = attn.kv_a_proj_with_mqa(x_ND)
    c_Nc, k_rope_N1r = attn.kv_a_layernorm(kv_NC[:, : attn.kv_lora_rank]), kv_NC[:, None, attn.kv_lora_rank:]
    rotate = hf.apply_rotary_pos_emb_interleave if attn.config.rope_interleave else hf.apply_rotary_pos_emb
    q_rope, k_rope = rotate(q_NHQ[..., n:], k_rope_N1r, cos_Nr, sin_Nr, unsqueeze_dim=1)
    return Projected(torch.cat([q_NHQ[..., :n], q_rope], dim=-1), torch.cat([c_Nc, k_rope[:, 0]], dim=-1))


def prefill(attn, q_NHQ: torch.Tensor, latent_NC: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """Causal attention of whole prompts (lengths[i] consecutive rows each, from position 0): [N, H*v]."""
    N, H = q_NHQ.shape[:2]
    n, c, v = attn.qk_nope_head_dim, attn.kv_lora_rank, attn.v_head_dim
    kv_NHx = attn.kv_b_proj(latent_NC[:, :c]).view(N, H, n + v)
    k_NHQ = torch.cat([kv_NHx[..., :n], latent_NC[:, None, c:].expand(N, H, -1)], dim=-1)
    # Pad the prompts to [B, H, T, .]: padding reads row N (zeros) and is masked out as a key.
    B, T = len(lengths), max(lengths)
    index_BT, valid_BT = _padded_rows(lengths, T, q_NHQ.device)
    pad = lambda x: torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index_BT].transpose(1, 2)  # noqa: E731
    q, k, val = pad(q_NHQ), pad(k_NHQ), pad(kv_NHx[..., n:])
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask_B1TT = (causal_TT & valid_BT[:, None, :])[:, None]
    out_BHTv = F.scaled_dot_product_attention(q, k, val, attn_mask=mask_B1TT, scale=attn.scaling)
    return out_BHTv.transpose(1, 2)[valid_BT].reshape(N, H * v)


def decode(attn, q_BHQ: torch.Tensor, cached_BXC: torch.Tensor, context_B: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its cached latents (absorbed projections): [B, H*v].

    cached_BXC [B, X, C] the sequences' cache rows (the new token's included), context_B [B] how many
    of the X are real. Static shapes given (B, X): no host sync, nothing data-dependent."""
    B, H = q_BHQ.shape[:2]
    n, c, v = attn.qk_nope_head_dim, attn.kv_lora_rank, attn.v_head_dim
    w_Hxc = attn.kv_b_proj.weight.view(H, n + v, c)
    q_abs_BHc = torch.einsum("bhn,hnc->bhc", q_BHQ[..., :n], w_Hxc[:, :n])
    scores_BHX = (torch.einsum("bhc,bxc->bhx", q_abs_BHc, cached_BXC[..., :c])
                  + torch.einsum("bhr,bxr->bhx", q_BHQ[..., n:], cached_BXC[..., c:])) * attn.scaling
    X = cached_BXC.shape[1]
    real_BX = torch.arange(X, device=q_BHQ.device)[None, :] < context_B[:, None]
    scores_BHX = scores_BHX.float().masked_fill(~real_BX[:, None, :], float("-inf"))
    probs_BHX = torch.softmax(scores_BHX, dim=-1).to(cached_BXC.dtype)
    latent_BHc = torch.einsum("bhx,bxc->bhc", probs_BHX, cached_BXC[..., :c])
    return torch.einsum("bhc,hvc->bhv", latent_BHc, w_Hxc[:, n:]).reshape(B, H * v)


def _padded_rows(lengths: tuple[int, ...], T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """index_BT [B, T] row of each (prompt, position) among the N rows (N = sum(lengths) for padding),
    valid_BT [B, T] bool real positions."""
    N = sum(lengths)
    starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0)
    positions_T = torch.arange(T, device=device)
    valid_BT = positions_T[None, :] < torch.tensor(lengths, device=device)[:, None]
    return torch.where(valid_BT, starts[:, None] + positions_T[None, :], N), valid_BT
