"""Fixed-capacity decode dispatch: static shapes, no host sync, capturable in a CUDA graph.

Legend: C capacity (token rows per rank: the decode batch's bucket; every rank of the group passes the
same C), K top-k, G ranks, S slots per rank, D hidden, W wire bytes of a row, N = G*C rows a rank
receives, M = N*K (row, k) entries a rank may have to compute.

As DeepEP's low-latency mode, every buffer is sized for the worst case, so nothing waits for sizes:
1. dispatch (`pack_rows`): block g of the send buffer [G, C, W] holds at row c token c's wire features
   and its K slot ids local to rank g (int32, -1 where its k-th expert is elsewhere; all -1 when the
   token does not go to g or is padding). A token crosses to a rank at most once, so a block holds at
   most C rows: the buffer cannot overflow. A rank with more than C tokens cannot enter the step: the
   host knows the shapes and raises (`check_capacity`), on every rank alike when C is chosen from
   the largest batch of the group. The counts travel inside the buffer: the receiver counts ids.
2. experts (`group_by_slot`): the receiver orders its M entries by (slot, source rank, token), the
   order the variable-size path computes in, and runs the grouped GEMMs over the bound M; entries past
   the real ones (offsets[S]) belong to no slot and are computed by no one.
3. combine (`scatter_results`, `combine`): results go back in a [G, C*K, D] buffer at the (token, k)
   they answer; the source takes each assignment's result from its destination's block and sums
   w·y over k in k order: the same sums, in the same order, as the variable-size path.
The wire carries every block whole: at G=2, C=128 and DeepSeek-V3 shapes 1.9 MB out in dispatch and
29 MB in combine per rank (half of it to itself), microseconds on NVLink next to the expert weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplace.runtime.experts import ExpertPath, encode_tokens


@dataclass(frozen=True)
class SlotGroups:
    """Receiver side of one step: order_M int64 [M] (row * K + k) entries sorted by (slot, source, token),
    real entries first; counts_S int64 [S] entries per local slot (on the device)."""

    order_M: torch.Tensor
    counts_S: torch.Tensor


def check_capacity(tokens: int, capacity: int) -> None:
    """ValueError when a batch does not fit the step's capacity (before any collective starts)."""
    if tokens > capacity:
        raise ValueError(f"decode batch of {tokens} tokens exceeds the step's capacity of {capacity} tokens per "
                         f"rank: pick a larger bucket or take the variable-size path")


def slot_counts(slots_CK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[num_slots] int64 assignments per global slot; -1 (padding) is not counted."""
    where = torch.where(slots_CK >= 0, slots_CK, num_slots).reshape(-1)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slots_CK.device)
    return counts.index_add_(0, where, torch.ones_like(where))[:num_slots]


def pack_rows(x_CD: torch.Tensor, slots_CK: torch.Tensor, slots_per_rank: int, world_size: int,
              path: ExpertPath, ids_at: int) -> torch.Tensor:
    """Send buffer [G, C, W] uint8 (step 1 above): features of every token in every block, then the ids."""
    (C, K), G, S = slots_CK.shape, world_size, slots_per_rank
    device = x_CD.device
    tokens_CW = encode_tokens(x_CD, path, ids_at + 4 * K)
    routed_CK = slots_CK >= 0
    ids_GCK = torch.full((G, C, K), -1, dtype=torch.int32, device=device)
    # (dest, c, k) is written by (c, k) alone; padding writes its -1 into block 0, which holds -1 there
    token_CK = torch.arange(C, device=device)[:, None].expand(C, K)
    k_CK = torch.arange(K, device=device)[None, :].expand(C, K)
    local_CK = torch.where(routed_CK, slots_CK % S, -1).int()
    ids_GCK[torch.where(routed_CK, slots_CK // S, 0), token_CK, k_CK] = local_CK
    send_GCW = tokens_CW.unsqueeze(0).repeat(G, 1, 1)
    send_GCW[:, :, ids_at:] = ids_GCK.view(torch.uint8).view(G, C, 4 * K)
    return send_GCW


def group_by_slot(recv_GCW: torch.Tensor, slots_per_rank: int, top_k: int, ids_at: int) -> SlotGroups:
    """Received rows' (row, k) entries grouped by local slot (step 2 above)."""
    (G, C, _), S, K = recv_GCW.shape, slots_per_rank, top_k
    N, device = G * C, recv_GCW.device
    ids_NK = recv_GCW[..., ids_at: ids_at + 4 * K].reshape(N, 4 * K).view(torch.int32).long()
    routed_NK = ids_NK >= 0
    key_NK = torch.where(routed_NK, ids_NK * N + torch.arange(N, device=device)[:, None], S * N)
    order_M = torch.argsort(key_NK.reshape(-1), stable=True)
    where = torch.where(routed_NK, ids_NK, S).reshape(-1)
    counts = torch.zeros(S + 1, dtype=torch.int64, device=device).index_add_(0, where, torch.ones_like(where))
    return SlotGroups(order_M, counts[:S])


def scatter_results(y_MD: torch.Tensor, groups: SlotGroups, world_size: int) -> torch.Tensor:
    """Results in slot order -> [G, C*K, D] at the (token, k) of the source they answer."""
    back = torch.empty_like(y_MD).index_copy_(0, groups.order_M, y_MD)
    return back.view(world_size, -1, y_MD.shape[1])


def combine(back_GQD: torch.Tensor, slots_CK: torch.Tensor, slots_per_rank: int, weights_CK: torch.Tensor,
            path: ExpertPath) -> torch.Tensor:
    """Σ_k w[c, k] · y[c, k] over the routed k, y taken from the destination's block: [C, D] (padding: 0)."""
    (C, K), device = slots_CK.shape, slots_CK.device
    routed_CK = slots_CK >= 0
    dest_CK = torch.where(routed_CK, slots_CK // slots_per_rank, 0)
    at_CK = dest_CK * (C * K) + torch.arange(C * K, device=device).view(C, K)
    y_AD = back_GQD.reshape(-1, back_GQD.shape[2])[at_CK.reshape(-1)]
    if path is ExpertPath.fp8:
        from moeplace.kernels.permute import RoutingPlan, unpermute_combine

        at_TK = torch.where(routed_CK, torch.arange(C * K, device=device).view(C, K), -1).int()
        # the kernel reads only row_pos: the offsets are a placeholder of the right type
        plan = RoutingPlan(torch.zeros(2, dtype=torch.int32, device=device), at_TK)
        return unpermute_combine(y_AD, plan, weights_CK.float().contiguous())
    # The variable path's sum: slot-sorted order, index_add_ row by row (bit-identical on CPU).
    order_A = torch.argsort(slots_CK.reshape(-1), stable=True)
    y_AD = torch.where(routed_CK.reshape(-1)[order_A, None], y_AD[order_A], 0)
    y_AD = y_AD * weights_CK.reshape(-1)[order_A, None].to(y_AD.dtype)
    return torch.zeros(C, y_AD.shape[1], dtype=y_AD.dtype, device=device).index_add_(0, order_A // K, y_AD)
