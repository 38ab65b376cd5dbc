"""`EPMoE`: the expert-parallel MoE layer that replaces transformers' DeepseekV3MoE in each MoE layer.

Legend: T tokens of this rank, K top-k, D hidden, F expert intermediate, E logical experts,
S slots on this rank, G ranks, A = T*K (token, expert) assignments, M rows received by this rank;
lower-case f, d: 128-blocks along F, D (FP8 scale tensors).

Every rank runs attention on the whole batch (inputs are identical on all ranks); in each MoE layer
rank g takes the g-th contiguous share of the batch's real (unpadded) tokens, routes them, sends
each (token, expert) row to the rank holding the chosen slot (all_to_all), computes its slots'
experts, sends the results back, combines them with the routing weights, adds the shared expert, and
finally all-gathers the shares so every rank again holds the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplace.placement import Placement
from moeplace.runtime.checkpoint import Checkpoint
from moeplace.runtime.comm import Comm
from moeplace.runtime.config import ModelConfig
from moeplace.runtime.fp8 import FP8_DTYPE, dequantize_blockwise, scale_shape
from moeplace.runtime.routing import RouterConfig, SlotTable, assign_slots, select_experts


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
    Statistics of the last forward (EPModel sums them over the ranks each step):
      routed_counts_E [E] int64 (token, expert) assignments this rank routed to each logical expert
      (the global count is the sum over ranks); slot_tokens_S [S] int64 rows this rank's slots computed.
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
        self.gate = Gate(E, D, device)
        self.shared_experts = DeepseekV3MLP(hf_config, intermediate_size=Fi * config.n_shared_experts).to(device, dtype)
        self.table = SlotTable.from_placement(placement, row, device)
        first = comm.rank * S
        slots = lambda shape, dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        # Non-persistent: slots are filled by `load_slots` (this rank's experts only), not by state_dict.
        for name, tensor in {
            "w13_SFD": slots((S, 2 * Fi, D), FP8_DTYPE),
            "w13_sinv_Sfd": slots((S, 2 * f, d), torch.float32),
            "w2_SDF": slots((S, D, Fi), FP8_DTYPE),
            "w2_sinv_Sdf": slots((S, d, f), torch.float32),
            "slot_experts_S": torch.as_tensor(placement.phy2log_LP[row, first: first + S], device=device),
            "routed_counts_E": slots((E,), torch.int64),
            "slot_tokens_S": slots((S,), torch.int64),
        }.items():
            self.register_buffer(name, tensor, persistent=False)
        self.token_mask_BT: torch.Tensor | None = None  # set by EPModel around each forward

    def load_slots(self, ckpt: Checkpoint) -> None:
        """Read the experts of this rank's slots (and only those) from the checkpoint."""
        for s, expert in enumerate(self.slot_experts_S.tolist()):
            w = ckpt.read_expert(self.layer_id, expert)
            self.w13_SFD[s].copy_(w.w13_FD)
            self.w13_sinv_Sfd[s].copy_(w.w13_sinv_fd)
            self.w2_SDF[s].copy_(w.w2_DF)
            self.w2_sinv_Sdf[s].copy_(w.w2_sinv_df)

    def forward(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = hidden_BTD.shape
        x_TD = hidden_BTD.reshape(B * T, D)
        live = torch.ones(B * T, dtype=torch.bool, device=x_TD.device) if self.token_mask_BT is None \
            else self.token_mask_BT.reshape(B * T)
        real = live.nonzero().squeeze(1)
        shares = _shares(len(real), self.comm.world_size)
        start = sum(shares[: self.comm.rank])
        mine = real[start: start + shares[self.comm.rank]]
        x_mine = x_TD[mine]
        y_mine = self._routed(x_mine) + self.shared_experts(x_mine)
        out_TD = torch.zeros_like(x_TD)
        out_TD[real] = self.comm.all_gather_rows(y_mine, shares)
        return out_TD.view(B, T, D)

    def _routed(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, K, S = x_TD.shape[0], self.router.top_k, self.w13_SFD.shape[0]
        comm = self.comm
        # 1. route: logical experts, then physical slots
        logits_TE = F.linear(x_TD.float(), self.gate.weight)
        ids_TK, weights_TK = select_experts(logits_TE, self.gate.e_score_correction_bias, self.router)
        slots_TK = assign_slots(ids_TK, self.table, comm.rank)
        self.routed_counts_E.copy_(torch.bincount(ids_TK.reshape(-1), minlength=self.routed_counts_E.numel()))
        # 2. dispatch: rows sorted by slot, hence by destination rank
        order_A = torch.argsort(slots_TK.reshape(-1), stable=True)
        token_A = order_A // K
        slot_A = slots_TK.reshape(-1)[order_A]
        send_G = torch.bincount(slot_A // S, minlength=comm.world_size)
        recv_G = comm.exchange_counts(send_G)
        send, recv = send_G.tolist(), recv_G.tolist()
        x_MD = comm.all_to_all(x_TD[token_A], send, recv)
        local_M = comm.all_to_all(slot_A % S, send, recv)
        # 3. experts, 4. results back to their source ranks
        y_AD = comm.all_to_all(self._experts(x_MD, local_M), recv, send)
        # 5. combine with the routing weights
        y_AD = y_AD * weights_TK.reshape(-1)[order_A, None].to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)

    def _experts(self, x_MD: torch.Tensor, slot_M: torch.Tensor) -> torch.Tensor:
        """Rows x_MD through the expert of local slot slot_M (CPU reference: dequantise, then matmul)."""
        counts_S = torch.bincount(slot_M, minlength=self.w13_SFD.shape[0])
        self.slot_tokens_S.copy_(counts_S)
        order = torch.argsort(slot_M, stable=True)
        out_MD = torch.empty_like(x_MD)
        start = 0
        for s, n in enumerate(counts_S.tolist()):
            if n:
                rows = order[start: start + n]
                out_MD[rows] = self._expert(s, x_MD[rows])
                start += n
        return out_MD

    def _expert(self, s: int, x_ND: torch.Tensor) -> torch.Tensor:
        Fi, f = self.w2_SDF.shape[2], self.w13_sinv_Sfd.shape[1] // 2
        w13 = self.w13_SFD[s]
        sinv = self.w13_sinv_Sfd[s]
        # gate and up are dequantised apart: each has its own block grid when F is not a block multiple.
        gate_FD = dequantize_blockwise(w13[:Fi], sinv[:f], self.block, x_ND.dtype)
        up_FD = dequantize_blockwise(w13[Fi:], sinv[f:], self.block, x_ND.dtype)
        down_DF = dequantize_blockwise(self.w2_SDF[s], self.w2_sinv_Sdf[s], self.block, x_ND.dtype)
        return (F.silu(x_ND @ gate_FD.T) * (x_ND @ up_FD.T)) @ down_DF.T


def _shares(num_tokens: int, world_size: int) -> list[int]:
    """Tokens each rank routes: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_tokens, world_size)
    return [base + (g < extra) for g in range(world_size)]
