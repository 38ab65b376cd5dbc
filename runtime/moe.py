"""`EPMoE`: the expert-parallel MoE layer that replaces transformers' DeepseekV3MoE in each MoE layer.

Legend: T tokens of this rank, K top-k, D hidden, F expert intermediate, E logical experts,
S slots on this rank, G ranks, P = G*S global slots, A = T*K (token, expert) assignments,
U rows sent or received (one per (token, destination rank)), M assignments received by this rank;
lower-case f, d: 128-blocks along F, D (FP8 scale tensors).

Data-parallel attention (`forward`): each rank brings its own sequences' tokens (maybe none) and
routes all of them. Replicated attention (`forward_shared`, the recompute path): every rank holds the
whole batch and rank g routes the g-th contiguous share of its real (unpadded) tokens. One step:
1. route: gate -> logical experts -> physical slots; assignments sorted by slot (hence by rank);
2. dispatch: each token goes once to each rank that holds any of its slots, with the list of those
   slots (all_to_all); a token with several experts on one rank crosses the wire once, not once per
   expert (exact: the same bytes, expanded on arrival);
3. experts: the rank computes its slots' experts on the received rows, grouped by slot;
4. combine: one result row per assignment goes back (all_to_all) and is summed with the routing
   weights. (Summing a token's experts on the computing rank would send fewer rows back, but it
   regroups the sum and rounds the partial sums to the wire dtype: not exact, so not done.)
The shared expert runs locally (in `forward_shared` the shares are then all-gathered). Steps 1-4 are
`step_with_ids` (route from given logical experts; their data movement is runtime/dispatch.py), which a
benchmark can call with its own routing and a `PhaseTimer` (runtime/moe_output.py, with the step's
`MoEOutput` and `Traffic`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from moeplace.placement import Placement
from moeplace.runtime.checkpoint import Checkpoint
from moeplace.runtime.comm import Comm
from moeplace.runtime.config import ModelConfig
from moeplace.runtime.decode import check_capacity, combine, group_by_slot, pack_rows, scatter_results, \
    slot_counts
from moeplace.runtime.dispatch import (DispatchPlan, by_slot, combine_rows, dispatch_rows, ids_offset,
                                       plan_rows, to_sources)
from moeplace.runtime.experts import ExpertPath, decode_features, fp8_experts, reference_experts
from moeplace.runtime.moe_output import MoEOutput, PhaseTimer, Traffic, _no_lap
from moeplace.kernels.fp8 import FP8, scale_shape
from moeplace.runtime.routing import RouterConfig, SlotTable, assign_slots, select_experts
from moeplace.runtime.slots import SlotWeights, StagedLayer, as_words, copy_in, to_device


class Gate(nn.Module):
    """Router parameters under the checkpoint's names (mlp.gate.weight, mlp.gate.e_score_correction_bias)."""

    def __init__(self, num_experts: int, hidden: int, device: torch.device):
        super().__init__()
        # float32 whatever the model dtype: the bias decides near-ties between experts.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device))


class EPMoE(nn.Module):
    """One MoE layer (model layer `layer_id`, row `row` of the placement) on rank `comm.rank`.

    Slot weights, overwritable in place by a reshard (slot s of this rank is global slot rank*S + s):
      w13_SFD  [S, 2F, D] float8_e4m3fn (gate rows, then up rows)   w13_sinv_Sfd [S, 2*ceil(F/128), ceil(D/128)] float32
      w2_SDF   [S, D, F]  float8_e4m3fn                              w2_sinv_Sdf  [S, ceil(D/128), ceil(F/128)] float32
      slot_experts_S [S] int64 logical expert in each slot.
    `expert_path`: ExpertPath.fp8 (moeplace.kernels) by default on CUDA where the shapes fit, else
    reference; settable (tests check the CUDA path against the exact reference).
    Statistics, kept on the device (no host sync) and summed over the ranks by EPModel.collect_stats:
      window_slots_GS [G, S] int64 (token, expert) assignments this rank sent to each global slot since
      the last fold: the dispatch counts them anyway, so recording costs one add per step;
      window_counts_E [E] int64 and window_rows_G [G] int64: the folded window (`fold_window`), per
      logical expert and per destination rank (the global counts are the sums over ranks);
      slot_tokens_S [S] int64 rows this rank's slots computed in the last step.
    Per-step values (the tokens' selections, the step's Traffic) are returned in a MoEOutput, not kept.
    """

    def __init__(self, config: ModelConfig, hf_config, layer_id: int, row: int, placement: Placement,
                 comm: Comm, device: torch.device, dtype: torch.dtype):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

        super().__init__()
        self.layer_id, self.row, self.comm = layer_id, row, comm
        self.router = RouterConfig.from_model(config)
        self.block = config.weight_block_size
        E, D, Fi = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        S = placement.topology.slots_per_gpu
        f, d = scale_shape((Fi, D), self.block)
        self.expert_path = ExpertPath.default(torch.device(device), D, Fi, self.block)
        self.gate = Gate(E, D, device)
        self.shared_experts = DeepseekV3MLP(hf_config, intermediate_size=Fi * config.n_shared_experts).to(device, dtype)
        self.table = SlotTable.from_placement(placement, row, device)
        first = comm.rank * S
        slots = lambda shape, dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        # Non-persistent: slots are filled by `load_slots` (this rank's experts only), not by state_dict.
        for name, tensor in {
            "w13_SFD": slots((S, 2 * Fi, D), FP8),
            "w13_sinv_Sfd": slots((S, 2 * f, d), torch.float32),
            "w2_SDF": slots((S, D, Fi), FP8),
            "w2_sinv_Sdf": slots((S, d, f), torch.float32),
            # copies (torch.tensor), never views of the placement's arrays: `use_layout` writes in place
            "slot_experts_S": torch.tensor(placement.phy2log_LP[row, first: first + S], device=device),
            "window_slots_GS": slots((comm.world_size, S), torch.int64),
            "window_counts_E": slots((E,), torch.int64),
            "window_rows_G": slots((comm.world_size,), torch.int64),
            "phy2log_P": torch.tensor(placement.phy2log_LP[row], dtype=torch.int64, device=device),
            "slot_tokens_S": slots((S,), torch.int64),
        }.items():
            self.register_buffer(name, tensor, persistent=False)
        self.counting = True  # the window counters; off only for the recorder benchmark's baseline

    def load_slots(self, ckpt: Checkpoint) -> None:
        """Read the experts of this rank's slots (and only those) from the checkpoint."""
        for s, expert in enumerate(self.slot_experts_S.tolist()):
            w = ckpt.read_expert(self.layer_id, expert)
            self.w13_SFD[s].copy_(w.w13_FD)
            self.w13_sinv_Sfd[s].copy_(w.w13_sinv_fd)
            self.w2_SDF[s].copy_(w.w2_DF)
            self.w2_sinv_Sdf[s].copy_(w.w2_sinv_df)

    def read_slot(self, slot: int) -> SlotWeights:
        """Slot `slot` (0..S-1) of this rank: views of its weights and scales, valid until `install`."""
        return SlotWeights(self.w13_SFD[slot], self.w13_sinv_Sfd[slot], self.w2_SDF[slot], self.w2_sinv_Sdf[slot])

    def install(self, staged: StagedLayer, layout: Placement) -> None:
        """Between two steps: the staged experts into their slots, then this layer's routing from
        `layout` (`use_layout`; its row `self.row` is staged.phy2log_P).

        Every write is in place (captured CUDA graphs keep pointing at these tensors); on a GPU the
        copies queue on the current stream, ahead of the next step's kernels. The window's per-slot
        counts are folded first: they belong to the old layout's experts."""
        assert (layout.phy2log_LP[self.row] == staged.phy2log_P).all(), "the layout is not the staged one"
        self.fold_window()
        device = self.w13_SFD.device
        dst, fan_dst, fan_src = (to_device(a, device) for a in (staged.dst_slot_N, staged.fanout_dst_X,
                                                                staged.fanout_src_X))
        for slots, buffer in zip(self.read_slot(slice(None)).tensors(), staged.buffers.tensors()):
            # integer words: index_copy_ has no FP8 kernels, and bytes are what moved
            slots, buffer = as_words(slots), as_words(buffer)
            slots.index_copy_(0, dst, buffer)
            if len(fan_dst):
                slots.index_copy_(0, fan_dst, buffer[fan_src])
            if buffer.is_cuda:  # the reshard stream allocated it; freed only after this stream's copies
                buffer.record_stream(torch.cuda.current_stream(buffer.device))
        self.use_layout(layout)

    def fold_window(self) -> None:
        """The per-slot counts so far -> per logical expert (under the live placement) and per rank.
        Called before the placement of this layer changes (a reshard's swap) and at each collect."""
        self.window_counts_E.index_add_(0, self.phy2log_P, self.window_slots_GS.reshape(-1))
        self.window_rows_G.add_(self.window_slots_GS.sum(dim=1))
        self.window_slots_GS.zero_()

    def use_layout(self, placement: Placement) -> None:
        """This layer's routing table, slot experts and slot -> expert map from `placement`, copied into
        the tensors in place, so CUDA graphs that captured them stay valid. The caller folds the window
        before (the counts so far belong to the old layout) and installs the moved slots' weights."""
        S = self.w13_SFD.shape[0]
        row_P = torch.as_tensor(placement.phy2log_LP[self.row], dtype=torch.int64)
        copy_in(self.slot_experts_S, row_P[self.comm.rank * S: (self.comm.rank + 1) * S])
        copy_in(self.phy2log_P, row_P)
        self.table.copy_from(SlotTable.from_placement(placement, self.row, torch.device("cpu")))

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        """Data-parallel attention: every token of x_TD [T, D] is this rank's own (T may be 0, an idle
        rank's empty batch). Routed experts + shared expert: MoEOutput with y_TD [T, D] x's dtype.
        A collective: every rank of the group calls it in the same layer of the same step."""
        routed = self._routed(x_TD)
        return MoEOutput(routed.y_TD + self.shared_experts(x_TD), routed.ids_TK, routed.traffic)

    def forward_shared(self, hidden_BTD: torch.Tensor, mask_BT: torch.Tensor | None) -> MoEOutput:
        """Replicated attention (identical hidden_BTD [B, T, D] on every rank): rank g routes the g-th
        contiguous share of the real tokens (mask_BT bool [B, T], None = all real), and the shares are
        all-gathered so every rank again holds the whole batch. y_TD [B*T, D] (padding rows zero);
        ids_TK are this rank's share's selections."""
        B, T, D = hidden_BTD.shape
        x_TD = hidden_BTD.reshape(B * T, D)
        live = torch.ones(B * T, dtype=torch.bool, device=x_TD.device) if mask_BT is None else mask_BT.reshape(B * T)
        real = live.nonzero().squeeze(1)
        shares = _shares(len(real), self.comm.world_size)
        start = sum(shares[: self.comm.rank])
        mine = self.forward(x_TD[real[start: start + shares[self.comm.rank]]])
        out_TD = torch.zeros_like(x_TD)
        out_TD[real] = self.comm.all_gather_rows(mine.y_TD, shares)
        return MoEOutput(out_TD, mine.ids_TK, mine.traffic)

    def _routed(self, x_TD: torch.Tensor) -> MoEOutput:
        logits_TE = F.linear(x_TD.float(), self.gate.weight)
        ids_TK, weights_TK = select_experts(logits_TE, self.gate.e_score_correction_bias, self.router)
        y_TD, traffic = self.step_with_ids(x_TD, ids_TK, weights_TK)
        return MoEOutput(y_TD, ids_TK, traffic)

    def forward_decode(self, x_CD: torch.Tensor, live_C: torch.Tensor) -> MoEOutput:
        """`forward` through fixed-capacity buffers (`decode_step`): static shapes, no host sync on the fp8
        path, capturable in a CUDA graph. x_CD [C, D] this rank's decode tokens padded to the step's
        capacity C (the same on every rank); live_C bool [C] the real ones. y_TD [C, D]: padding rows are
        the shared expert of their input (the caller drops them); ids_TK [C, K] (padding rows: any ids);
        traffic: the fixed blocks that move whatever the batch."""
        logits_CE = F.linear(x_CD.float(), self.gate.weight)
        ids_CK, weights_CK = select_experts(logits_CE, self.gate.e_score_correction_bias, self.router)
        y_CD = self.decode_step(x_CD, ids_CK, weights_CK, live_C) + self.shared_experts(x_CD)
        return MoEOutput(y_CD, ids_CK, self._decode_traffic(x_CD, ids_CK.shape[1]))

    def _decode_traffic(self, x_CD: torch.Tensor, K: int) -> Traffic:
        (C, D), G = x_CD.shape, self.comm.world_size
        row_bytes = ids_offset(self.expert_path, D, x_CD.dtype) + 4 * K
        return Traffic([C] * G, [C * K] * G, [C] * G, [C * K] * G, row_bytes, D * x_CD.element_size())

    def decode_step(self, x_CD: torch.Tensor, ids_CK: torch.Tensor, weights_CK: torch.Tensor, live_C: torch.Tensor,
                    timer: PhaseTimer | None = None) -> torch.Tensor:
        """`step_with_ids` through fixed-capacity buffers (runtime/decode.py): y_CD [C, D] x's dtype, zeros on
        padding. x_CD [C, D], ids_CK int64 [C, K] (any valid expert id on padding rows), weights_CK float32,
        live_C bool [C] (the real tokens). A collective in which every rank passes the same C. Static
        shapes, no host sync on the fp8 path: capturable in a CUDA graph (the reference path reads the
        per-slot counts on the host). Counts into the window like `step_with_ids`; sets neither
        `last_ids_TK` nor `last_traffic` (host values a replayed graph would not update)."""
        lap = timer.lap if timer else _no_lap
        (C, D), K = x_CD.shape, ids_CK.shape[1]
        G, S, ids_at = self.comm.world_size, self.w13_SFD.shape[0], ids_offset(self.expert_path, D, x_CD.dtype)
        check_capacity(ids_CK.shape[0], C)
        # 1. route
        slots_CK = assign_slots(ids_CK, self.table, self.comm.rank, live_C)
        if self.counting:
            self.window_slots_GS.add_(slot_counts(slots_CK, G * S).view(G, S))
        lap("route")
        # 2. dispatch
        send_GCW = pack_rows(x_CD, slots_CK, S, G, self.expert_path, ids_at)
        lap("dispatch")
        recv_GCW = self.comm.all_to_all_equal(send_GCW)
        lap("dispatch_a2a")
        # 3. experts
        groups = group_by_slot(recv_GCW, S, K, ids_at)
        self.slot_tokens_S.copy_(groups.counts_S)
        rows_MW = recv_GCW.view(G * C, -1)[groups.order_M // K]
        back_GQD = scatter_results(self._slot_experts(rows_MW, groups.counts_S, x_CD.dtype), groups, G)
        lap("experts")
        # 4. combine
        back_GQD = self.comm.all_to_all_equal(back_GQD)
        lap("combine_a2a")
        y_CD = combine(back_GQD, slots_CK, S, weights_CK, self.expert_path)
        lap("combine")
        return y_CD

    def step_with_ids(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      timer: PhaseTimer | None = None) -> tuple[torch.Tensor, Traffic]:
        """Routed experts of this rank's tokens, their logical experts already chosen: (y_TD [T, D] x's
        dtype, the step's Traffic).

        x_TD [T, D]; ids_TK int64 [T, K] distinct logical experts per token; weights_TK float32 [T, K].
        A collective: every rank of the group calls it (T may differ, and may be 0). With `timer`, laps
        route, dispatch, dispatch_a2a, experts, combine_a2a, combine (the *_a2a laps: the all_to_all alone).
        """
        lap = timer.lap if timer else _no_lap
        # 1. route
        slots_TK = assign_slots(ids_TK, self.table, self.comm.rank)
        plan = plan_rows(slots_TK, self.comm.world_size, self.w13_SFD.shape[0])
        if self.counting:
            self.window_slots_GS.add_(plan.counts_GX[:, :-1])
        lap("route")
        # 2. dispatch
        received_UW = dispatch_rows(x_TD, plan, self.comm, self.w13_SFD.shape[0], self.expert_path, lap)
        traffic = Traffic(plan.send_rows, plan.send_assignments, plan.recv_rows, plan.recv_assignments,
                                    received_UW.shape[1], x_TD.shape[1] * x_TD.element_size())
        # 3. experts
        y_MD = self._experts(received_UW, plan, x_TD.dtype)
        lap("experts")
        # 4. combine
        y_AD = self.comm.all_to_all(y_MD, plan.recv_assignments, plan.send_assignments)
        lap("combine_a2a")
        y_TD = combine_rows(y_AD, plan, weights_TK, x_TD, self.expert_path)
        lap("combine")
        return y_TD, traffic

    def _experts(self, received_UW: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
        """Received rows -> one output row per assignment, in the order the sources sent their assignments."""
        S, D = self.w13_SFD.shape[0], self.w13_SFD.shape[2]
        row_M, slot_M = by_slot(received_UW, plan, S, D, self.expert_path, dtype)
        counts_S = plan.recv_GX[:, :S].sum(0)
        self.slot_tokens_S.copy_(counts_S)
        y_MD = self._slot_experts(received_UW[row_M], counts_S, dtype, plan.recv_slot_rows)
        return to_sources(y_MD, row_M, slot_M, plan, S)

    def _slot_experts(self, rows_MW: torch.Tensor, counts_S: torch.Tensor, dtype: torch.dtype,
                      counts_host: list[int] | None = None) -> torch.Tensor:
        """Rows grouped by slot (counts_S [S] int64 rows each, in slot order; rows past their sum are spare)
        through their slots' experts: [M, D] `dtype`, spare rows unwritten. `counts_host`: the same counts
        on the host, where the caller has them (the expert GEMMs then need no host sync)."""
        D = self.w13_SFD.shape[2]
        if self.expert_path is ExpertPath.fp8:
            offsets_S1 = torch.zeros(counts_S.shape[0] + 1, dtype=torch.int32, device=rows_MW.device)
            offsets_S1[1:] = counts_S.cumsum(0)
            offsets_host = None if counts_host is None else [0, *itertools.accumulate(counts_host)]
            a_MD, a_scale_Md = decode_features(rows_MW, self.expert_path, D, dtype)
            return fp8_experts(a_MD, a_scale_Md, offsets_S1, self.w13_SFD, self.w13_sinv_Sfd, self.w2_SDF,
                               self.w2_sinv_Sdf, dtype, offsets_host)
        return reference_experts(decode_features(rows_MW, self.expert_path, D, dtype), counts_S.tolist(),
                                 self.w13_SFD, self.w13_sinv_Sfd, self.w2_SDF, self.w2_sinv_Sdf, self.block)


def _shares(num_tokens: int, world_size: int) -> list[int]:
    """Tokens each rank routes: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_tokens, world_size)
    return [base + (g < extra) for g in range(world_size)]
