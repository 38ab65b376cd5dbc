"""The data movement of `EPMoE.step_with_ids`, the variable-size expert-parallel step: which rows a rank
sends (`plan_rows`), sending them (`dispatch_rows`), putting the received assignments in slot order for
the expert GEMMs and the results back in the senders' order (`by_slot`, `to_sources`), and summing each
token's results (`combine_rows`). The decode path's fixed-capacity twin is runtime/decode.py.

Legend as in runtime/moe.py: T tokens of this rank, K top-k, D hidden, S slots per rank, G ranks,
A = T*K assignments, U rows sent or received (one per (token, destination rank)), M assignments
received by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplace.runtime.comm import Comm
from moeplace.runtime.experts import ExpertPath, encode_tokens, feature_bytes


@dataclass
class DispatchPlan:
    """One step's transient dispatch state (sender side, then what the exchange told), between phases.

    order_A [A] assignments (t*K + k) sorted by slot; slots_TK [T, K] global slots; row_TK [T, K] the
    sent row each assignment rides in; sent_GT [G, T] bool token t goes to rank g; row_GT [G, T] its row
    (where sent); counts_GX [G, S+1] int64 assignments per destination slot, then rows per destination;
    recv_GX the same from each source rank; host lists of rows and assignments sent to / received from
    each rank, and of rows received per local slot."""

    order_A: torch.Tensor
    slots_TK: torch.Tensor
    row_TK: torch.Tensor
    sent_GT: torch.Tensor
    row_GT: torch.Tensor
    counts_GX: torch.Tensor
    recv_GX: torch.Tensor | None = None
    send_rows: list[int] | None = None
    send_assignments: list[int] | None = None
    recv_rows: list[int] | None = None
    recv_assignments: list[int] | None = None
    recv_slot_rows: list[int] | None = None


def plan_rows(slots_TK: torch.Tensor, G: int, S: int) -> DispatchPlan:
    """Sender side: assignments sorted by slot; one row per (destination rank, token); counts per rank."""
    T, K = slots_TK.shape
    device = slots_TK.device
    order_A = torch.argsort(slots_TK.reshape(-1), stable=True)
    dest_TK = slots_TK // S
    # rows: destination-major, tokens in order within a destination
    sent_GT = torch.zeros(G, T, dtype=torch.bool, device=device)
    token_TK = torch.arange(T, device=device)[:, None].expand(T, K)
    sent_GT[dest_TK, token_TK] = True
    row_GT = sent_GT.reshape(-1).cumsum(0).view(G, T) - 1
    counts_GX = torch.empty(G, S + 1, dtype=torch.int64, device=device)
    counts_GX[:, :S] = count_ids(slots_TK.reshape(-1), G * S).view(G, S)
    counts_GX[:, S] = sent_GT.sum(dim=1)
    return DispatchPlan(order_A, slots_TK, row_GT[dest_TK, token_TK], sent_GT, row_GT, counts_GX)


def dispatch_rows(x_TD: torch.Tensor, plan: DispatchPlan, comm: Comm, S: int, path: ExpertPath, lap) -> torch.Tensor:
    """Send each planned row: the token's features, then its K local slots (int32, -1 = not on that rank).
    Fills the plan's host counts; the received rows [U, W] uint8, in source-rank order."""
    (T, D), K = x_TD.shape, plan.slots_TK.shape[1]
    plan.recv_GX = comm.exchange_counts(plan.counts_GX)
    # The all_to_all needs its sizes on the host: the step's one sync. It brings the rows per local
    # slot along, so the expert GEMMs need no sync of their own (grouped_gemm_fp8's host offsets).
    G = plan.counts_GX.shape[0]
    per_rank_4G = torch.stack([plan.counts_GX[:, S], plan.counts_GX[:, :S].sum(1), plan.recv_GX[:, S],
                               plan.recv_GX[:, :S].sum(1)]).reshape(-1)
    sizes = torch.cat([per_rank_4G, plan.recv_GX[:, :S].sum(0)]).tolist()
    plan.send_rows, plan.send_assignments, plan.recv_rows, plan.recv_assignments = (
        sizes[i * G: (i + 1) * G] for i in range(4))
    plan.recv_slot_rows = sizes[4 * G:]
    ids_at = ids_offset(path, D, x_TD.dtype)
    tokens_TW = encode_tokens(x_TD, path, ids_at + 4 * K)
    U = sum(plan.send_rows)
    # token of each row: compact the sent (destination, token) pairs, in order (scatter: no host sync)
    flat = torch.where(plan.sent_GT.reshape(-1), plan.row_GT.reshape(-1), U)
    token_U = torch.zeros(U + 1, dtype=torch.int64, device=x_TD.device)
    token_U.scatter_(0, flat, torch.arange(flat.numel(), device=x_TD.device) % max(T, 1))
    rows_UW = tokens_TW[token_U[:U]]
    ids_UK = torch.full((U, K), -1, dtype=torch.int32, device=x_TD.device)
    ids_UK[plan.row_TK, torch.arange(K, device=x_TD.device).expand(T, K)] = (plan.slots_TK % S).int()
    rows_UW[:, ids_at:] = ids_UK.view(torch.uint8)
    lap("dispatch")
    received_UW = comm.all_to_all(rows_UW, plan.send_rows, plan.recv_rows)
    lap("dispatch_a2a")
    return received_UW


def by_slot(received_UW: torch.Tensor, plan: DispatchPlan, S: int, D: int, path: ExpertPath,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The received assignments grouped by slot, then by source rank and token: (row_M, slot_M) int64,
    the received row and local slot of each."""
    U, K, device = received_UW.shape[0], plan.slots_TK.shape[1], received_UW.device
    M = sum(plan.recv_assignments)
    ids_at = ids_offset(path, D, dtype)
    ids_UK = received_UW[:, ids_at: ids_at + 4 * K].view(torch.int32).long()
    key_UK = torch.where(ids_UK >= 0, ids_UK * U + torch.arange(U, device=device)[:, None], S * U)
    pick_M = torch.argsort(key_UK.reshape(-1))[:M]
    return pick_M // K, ids_UK.reshape(-1)[pick_M]


def to_sources(y_MD: torch.Tensor, row_M: torch.Tensor, slot_M: torch.Tensor, plan: DispatchPlan, S: int) -> torch.Tensor:
    """Results in slot order -> the sources' order: source-major, then (slot, token) as each source sorted them."""
    counts_GS = plan.recv_GX[:, :S]
    G, M, device = counts_GS.shape[0], y_MD.shape[0], y_MD.device
    U = sum(plan.recv_rows)
    source_M = torch.repeat_interleave(torch.arange(G, device=device), plan.recv_GX[:, S], output_size=U)[row_M]
    by_source_GS = (counts_GS.reshape(-1).cumsum(0) - counts_GS.reshape(-1)).view(G, S)
    by_slot_SG = (counts_GS.t().reshape(-1).cumsum(0) - counts_GS.t().reshape(-1)).view(S, G)
    position_M = by_source_GS[source_M, slot_M] + torch.arange(M, device=device) - by_slot_SG[slot_M, source_M]
    return torch.empty_like(y_MD).index_copy_(0, position_M, y_MD)


def combine_rows(y_AD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor, x_TD: torch.Tensor,
                 path: ExpertPath) -> torch.Tensor:
    """Σ_k w[t, k] · y[t, k] from the results in slot-sorted assignment order: [T, D]."""
    K = plan.slots_TK.shape[1]
    if path is ExpertPath.fp8:
        from moeplace.kernels.permute import RoutingPlan, unpermute_combine

        A, device = y_AD.shape[0], y_AD.device
        position_TK = torch.empty(A, dtype=torch.int32, device=device)
        position_TK[plan.order_A] = torch.arange(A, dtype=torch.int32, device=device)
        offsets_P1 = torch.zeros(plan.counts_GX[:, :-1].numel() + 1, dtype=torch.int32, device=device)
        offsets_P1[1:] = plan.counts_GX[:, :-1].reshape(-1).cumsum(0)
        # fp32 sums in a fixed k order: deterministic, unlike index_add_'s atomics on a GPU
        return unpermute_combine(y_AD, RoutingPlan(offsets_P1, position_TK.view(-1, K)),
                                 weights_TK.float().contiguous())
    y_AD = y_AD * weights_TK.reshape(-1)[plan.order_A, None].to(y_AD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, plan.order_A // K, y_AD)


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64 occurrences of each id (bincount without its host sync on a GPU)."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def ids_offset(path: ExpertPath, hidden: int, dtype: torch.dtype) -> int:
    """Byte offset of a row's slot ids: after the features, 4-byte aligned so they view as int32."""
    return -(-feature_bytes(path, hidden, dtype) // 4) * 4
