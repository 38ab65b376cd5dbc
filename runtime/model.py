"""`EPModel`: a DeepSeek-V3-family checkpoint served expert-parallel across the ranks of a process group.

Attention, norms, embeddings and head are transformers' DeepseekV3ForCausalLM modules; each MoE
block is replaced by moeplace's `EPMoE`. Multi-rank use (every rank runs the same calls):

    dist.init_process_group("gloo")            # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    model = EPModel.load(model_dir, placement, group=dist.group.WORLD, device=torch.device("cpu"))
    logits_BTV = model.forward(input_ids_BT, attention_mask_BT)   # recompute: identical inputs on every rank
    logits_SV = model.step(cache, plan, token_ids_N)               # KV cache: each rank its own sequences
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moeplace.placement import Placement, trivial_placement
from moeplace.runtime.checkpoint import Checkpoint
from moeplace.runtime.comm import Comm
from moeplace.runtime.config import ModelConfig
from moeplace.runtime.forward import Forward, cached_step, recompute
from moeplace.runtime.kv_cache import KVCache, StepPlan
from moeplace.runtime.moe import EPMoE
from moeplace.topology import Topology


@dataclass(frozen=True)
class WindowStats:
    """What the ranks routed since the previous collect (host arrays).

    counts_LE [L, E] int64 (token, expert) assignments per logical expert, all ranks' tokens;
    gpu_load_LG [L, G] int64 (token, expert) rows each rank's experts computed;
    samples_TLK [T, L, K] top-k ids of this rank's sampled tokens, or None.
    """

    counts_LE: np.ndarray
    gpu_load_LG: np.ndarray
    samples_TLK: np.ndarray | None = None


class EPModel:
    """config: ModelConfig; placement: the live Placement; moe_layers: EPMoE per MoE layer (placement row order).

    Expert statistics stay on the device while steps run: each MoE layer adds its step's counts into
    its window buffers (no host sync). `collect_stats()`, a collective every rank calls at the same
    step boundary (the engine decides when, about once a second), sums them over the ranks, brings
    them to the host once and starts the next window. With `sample_rate` > 0 each forward also keeps
    the top-k ids of a random share of this rank's tokens, on the device, until the next collect.
    """

    def __init__(self, hf_model: nn.Module, config: ModelConfig, placement: Placement, moe_layers: list[EPMoE],
                 comm: Comm, device: torch.device):
        self.hf_model, self.config, self.placement = hf_model, config, placement
        self.moe_layers, self.comm, self.device = moe_layers, comm, device
        self.dtype = hf_model.dtype if hf_model is not None else torch.bfloat16  # activations, KV cache
        self.sample_rate = 0.0  # share of this rank's tokens whose top-k ids are kept (set on rank 0)
        self.max_samples = 8192  # per window: bounds the device memory the samples take
        self.sample_generator = np.random.default_rng(0)  # how many tokens a step samples
        self._rows_generator = torch.Generator(device=device).manual_seed(0)  # which ones, on the device
        self._samples: list[torch.Tensor] = []  # [n, L, K] device tensors since the last collect
        self._sampled = 0

    @classmethod
    def load(
        cls,
        model_dir: Path,
        placement: Placement | None,
        *,
        group: dist.ProcessGroup | None,
        device: torch.device,
        gpus_per_node: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> EPModel:
        """Load this rank's part of the model: non-MoE weights in full, routed experts of its slots only.

        placement None: the trivial placement (slot p holds expert p % E) over the group's ranks,
        ceil(E / world) slots per rank, `gpus_per_node` ranks per node (default: all on one node).
        group: the ranks that serve together (dist.group.WORLD under torchrun); None: this process alone.
        dtype: activations and non-expert weights (default float32 on CPU, bfloat16 on CUDA).
        A collective: every rank of the group must call it. ValueError (on every rank, so none hangs)
        when the checkpoint is bad or the placement does not fit the model or the group.
        """
        comm = Comm.of(group)
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        error = None
        try:
            with Checkpoint(model_dir) as ckpt:
                config = ckpt.config
                if placement is None:
                    placement = default_placement(config, comm.world_size, gpus_per_node or comm.world_size)
                check_placement(placement, config, comm.world_size, str(model_dir))
                model = cls._build(ckpt, placement, comm, torch.device(device), dtype)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
        if not comm.all_ok(error is None):
            raise error or ValueError(f"{model_dir}: another rank failed to load the model (see its error)")
        return model

    @classmethod
    def _build(cls, ckpt: Checkpoint, placement: Placement, comm: Comm, device: torch.device, dtype) -> EPModel:
        config = ckpt.config
        hf_model, hf_config = build_dense_model(config, device, dtype)
        moe_layers = []
        for row, layer_id in enumerate(config.moe_layers):
            moe = EPMoE(config, hf_config, layer_id, row, placement, comm, device, dtype)
            hf_model.model.layers[layer_id].mlp = moe
            moe_layers.append(moe)
        ckpt.load_module(hf_model)
        for moe in moe_layers:
            moe.load_slots(ckpt)
        return cls(hf_model, config, placement, moe_layers, comm, device)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Logits of every position, recomputed (no cache): logits_BTV float32 [B, T, vocab_size].

        input_ids_BT int64 [B, T]; attention_mask_BT int64 [B, T], 1 = real token, 0 = padding on the
        right (each row 1...1 0...0, at least one real token). Padding gets no expert compute, and the
        real tokens' logits are those of the unpadded sequence. A collective: every rank calls it with
        identical inputs.
        """
        return self.recompute(input_ids_BT, attention_mask_BT).logits

    def recompute(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> Forward:
        """`forward`, with the selections of the tokens this rank routed in each MoE layer."""
        check_inputs(input_ids_BT, attention_mask_BT, self.config.vocab_size)
        with torch.no_grad():
            out = recompute(self.hf_model, input_ids_BT.to(self.device), attention_mask_BT.to(self.device))
            self.record_samples(out.ids_L)
        return out

    def step(self, cache: KVCache, plan: StepPlan, token_ids_N: torch.Tensor) -> torch.Tensor:
        """One continuous-batching step of this rank's own sequences with the KV cache (runtime/forward.py,
        `cached_step`): logits_SV float32 [S, vocab] of each sequence's next token. A collective: every
        rank calls it in the same step, with its own sequences (maybe none)."""
        with torch.no_grad():
            out = cached_step(self.hf_model, cache, plan, token_ids_N.to(self.device))
            self.record_samples(out.ids_L)
        return out.logits

    def decode_step(self, cache: KVCache, plan: StepPlan, token_ids_B: torch.Tensor,
                    live_B: torch.Tensor | None = None) -> torch.Tensor:
        """`step` of decoding sequences only (one new token each): logits_BV. Static shapes for a given
        (batch, context bucket): the function a CUDA graph of the decode step captures. With live_B
        (bool [B], B the same on every rank) the MoE layers take the fixed-capacity path, which holds no
        host sync (`cached_step`); the recorder's samples then come from the live rows."""
        assert not plan.prefill_lengths, "decode_step takes decoding sequences only"
        if live_B is None:
            return self.step(cache, plan, token_ids_B)
        with torch.no_grad():
            out = cached_step(self.hf_model, cache, plan, token_ids_B.to(self.device), live_B)
            if self.sample_rate > 0:  # boolean indexing syncs: only when sampling, and never in a graph
                self.record_samples([ids_BK[live_B] for ids_BK in out.ids_L])
        return out.logits

    __call__ = forward

    def collect_stats(self) -> WindowStats:
        """The window since the last collect, summed over every rank's tokens; starts the next window.

        A collective: every rank calls it at the same step boundary. One all_reduce of an [L, E + G]
        tensor and one copy to the host per window, however many steps the window holds. The samples
        are this rank's own (rank 0 samples for the recorder).
        """
        E, G = self.config.n_routed_experts, self.comm.world_size
        stats = torch.zeros(len(self.moe_layers), E + G, dtype=torch.int64, device=self.device)
        for row, moe in enumerate(self.moe_layers):
            moe.fold_window()
            stats[row, :E] = moe.window_counts_E
            stats[row, E:] = moe.window_rows_G
            moe.window_counts_E.zero_()
            moe.window_rows_G.zero_()
        self.comm.all_reduce_sum(stats)
        samples = torch.cat(self._samples).cpu().numpy() if self._samples else None
        self._samples, self._sampled = [], 0
        stats = stats.cpu().numpy()
        return WindowStats(stats[:, :E], stats[:, E:], samples)

    def record_samples(self, ids_L: list[torch.Tensor]) -> None:
        """Keep the top-k ids of a random `sample_rate` share of this rank's tokens of a forward
        (ids_L: per MoE layer [T, K], the same T tokens in every layer)."""
        if self.sample_rate <= 0 or self._sampled >= self.max_samples or not ids_L:
            return
        sample = sample_rows(ids_L, self.sample_rate, self.sample_generator, self.max_samples - self._sampled,
                             self._rows_generator)
        if sample is not None:
            self._samples.append(sample)
            self._sampled += len(sample)


def sample_rows(ids_L: list[torch.Tensor], rate: float, generator: np.random.Generator, limit: int,
                device_generator: torch.Generator | None = None) -> torch.Tensor | None:
    """[n, L, K] the rows of a random `rate` share (at most `limit`) of the tokens of ids_L (L x [T, K]);
    None when none is drawn. How many is drawn on the host (T is a shape), which rows on the device
    (a random permutation's first n): no host sync, no host-to-device copy. A rank routes the same
    contiguous share of the batch's tokens in every MoE layer, so row t of every layer is the same token."""
    T = ids_L[0].shape[0]
    n = min(int(generator.binomial(T, rate)), limit) if T else 0
    if n == 0:
        return None
    rows = torch.randperm(T, device=ids_L[0].device, generator=device_generator)[:n]
    return torch.stack(ids_L, dim=1).index_select(0, rows)  # two launches, however many layers


def build_dense_model(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """transformers DeepseekV3ForCausalLM with every MoE block removed (nn.Identity), weights uninitialised.

    Built on the meta device first so the MoE blocks' full expert tensors (11 GB per DeepSeek-V3
    layer) are never allocated. Returns (model, transformers config).
    """
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf_config = config.to_hf()
    with torch.device("meta"):
        hf_model = DeepseekV3ForCausalLM(hf_config)
    for layer_id in config.moe_layers:
        hf_model.model.layers[layer_id].mlp = nn.Identity()
    hf_model = hf_model.to_empty(device=device).to(dtype).eval()
    # The rotary tables are computed in __init__, which ran on meta: compute them again for real.
    hf_model.model.rotary_emb = DeepseekV3RotaryEmbedding(hf_config).to(device)
    return hf_model, hf_config


def default_placement(config: ModelConfig, world_size: int, gpus_per_node: int) -> Placement:
    E = config.n_routed_experts
    topology = Topology(num_gpus=world_size, gpus_per_node=gpus_per_node, slots_per_gpu=-(-E // world_size))
    return trivial_placement(E, topology, np.array(config.moe_layers), config.num_hidden_layers)


def check_placement(placement: Placement, config: ModelConfig, world_size: int, model: str) -> None:
    """ValueError unless `placement` is for this model (experts, MoE layer ids) and this many ranks."""
    src = placement.source
    if placement.num_experts != config.n_routed_experts:
        raise ValueError(f"{src}: placement has {placement.num_experts} experts, {model} has {config.n_routed_experts}")
    if placement.layers.tolist() != config.moe_layers:
        raise ValueError(
            f"{src}: placement layers {_span(placement.layers.tolist())} are not the MoE layers "
            f"{_span(config.moe_layers)} of model {model}"
        )
    if placement.num_model_layers not in (None, config.num_hidden_layers):
        raise ValueError(f"{src}: placement is for a {placement.num_model_layers}-layer model, {model} has "
                         f"{config.num_hidden_layers} layers")
    if placement.topology.num_gpus != world_size:
        raise ValueError(f"{src}: placement is for {placement.topology.num_gpus} GPUs, but {world_size} rank(s) serve")


def check_inputs(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, vocab_size: int) -> None:
    if input_ids_BT.dim() != 2 or input_ids_BT.shape != attention_mask_BT.shape or input_ids_BT.numel() == 0:
        raise ValueError(f"input_ids {list(input_ids_BT.shape)} and attention_mask {list(attention_mask_BT.shape)} "
                         f"must both be [batch, tokens], non-empty")
    if input_ids_BT.dtype != torch.int64 or attention_mask_BT.dtype != torch.int64:
        raise ValueError(f"input_ids and attention_mask must be int64, got {input_ids_BT.dtype}, {attention_mask_BT.dtype}")
    if input_ids_BT.min() < 0 or input_ids_BT.max() >= vocab_size:
        raise ValueError(f"input_ids hold ids outside [0, {vocab_size})")
    mask = attention_mask_BT
    if not ((mask == 0) | (mask == 1)).all() or (mask[:, 1:] > mask[:, :-1]).any() or (mask[:, 0] == 0).any():
        raise ValueError("attention_mask must be right padding: each row 1...1 0...0 with at least one 1")


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "[]"
