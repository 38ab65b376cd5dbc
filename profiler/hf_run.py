"""Running a Hugging Face MoE model for the profiler: `_RouterTap` (forward hooks on the routers that
count and sample the top-k ids) and `_run_batch` (left-padded prefill, then greedy decoding).

Separate from `moeplace.profiler.hf`, which checks the request, loads the model and its tokenizer and
assembles the windows into a `Trace`; this module is the torch work per batch. Dimension letters as
there: B batch rows, S sequence positions, N = B·S tokens of one forward, L layers, E experts, K top-k.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


class _RouterTap:
    """Forward hooks on the routers: per-layer counts of the valid tokens' top-k ids, and a sample.

    Set `valid_N` (and `sample_N`), on the model's device, before each forward; `take()` hands out
    what the forwards of one batch routed and resets. Counts stay on the device until then, so
    counting adds no host sync per forward (sampling does: it gathers the sampled rows).
    """

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.routers = routers
        self.valid_N: torch.Tensor | None = None  # bool [N]: a real token, not padding
        self.sample_N: torch.Tensor | None = None  # bool [N]: keep its top-k ids
        self.counts_LE: list[torch.Tensor | None] = [None] * len(routers)
        self.sampled_L: list[list[torch.Tensor]] = [[] for _ in routers]
        self.handles = []

    def __enter__(self) -> _RouterTap:
        self.handles = [r.register_forward_hook(self._hook(layer)) for layer, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer: int):
        def on_router(module, args, output) -> None:
            ids_NK, valid_N = output[2], self.valid_N
            assert ids_NK.ndim == 2 and ids_NK.shape[0] == valid_N.shape[0] and not ids_NK.is_floating_point(), (
                f"{type(module).__name__} returned ids of shape {list(ids_NK.shape)} dtype {ids_NK.dtype} "
                f"for {valid_N.shape[0]} tokens")
            if self.counts_LE[layer] is None:
                self.counts_LE[layer] = torch.zeros(module.weight.shape[0], dtype=torch.int64, device=ids_NK.device)
            weight_NK = valid_N[:, None].expand_as(ids_NK).to(torch.int64)
            self.counts_LE[layer].index_add_(0, ids_NK.reshape(-1), weight_NK.reshape(-1))
            if self.sample_N is not None:
                self.sampled_L[layer].append(ids_NK[self.sample_N].cpu())

        return on_router

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """counts [L, E] int64 and sampled ids [T, L, K] since the last take."""
        assert all(c is not None for c in self.counts_LE), "a router never ran: was its MoE block replaced?"
        counts_LE = np.stack([c.cpu().numpy() for c in self.counts_LE])
        lengths = {sum(len(s) for s in sampled) for sampled in self.sampled_L}
        assert len(lengths) == 1, f"routers saw different sampled token counts {lengths}"
        K = self.routers[0].top_k
        sampled = [torch.cat(s) if s else torch.empty(0, K, dtype=torch.int64) for s in self.sampled_L]
        sampled_TLK = torch.stack(sampled, dim=1).numpy().astype(np.int64)
        self.counts_LE = [None] * len(self.routers)
        self.sampled_L = [[] for _ in self.routers]
        return counts_LE, sampled_TLK


def _run_batch(model, batch: list[list[int]], max_tokens: int, tap: _RouterTap, sample_rate: float,
               generator: torch.Generator) -> int:
    """Prefill `batch` (left-padded) and decode greedily; returns the tokens routed (padding excluded)."""
    device = model.get_input_embeddings().weight.device
    # transformers 5.24 names the KV-cache argument `cache` (and warns on `past_key_values`); 5.17 has
    # only `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    B, S = len(batch), max(len(p) for p in batch)
    # Left padding puts every row's last token in the last column, where decoding continues.
    input_ids_BS = torch.zeros(B, S, dtype=torch.int64)
    mask_BS = torch.zeros(B, S, dtype=torch.int64)
    for row, prompt_ids in enumerate(batch):
        input_ids_BS[row, S - len(prompt_ids):] = torch.tensor(prompt_ids)
        mask_BS[row, S - len(prompt_ids):] = 1
    # Positions count real tokens only, so a padded row sees the positions it would see alone.
    position_ids_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)

    # 1. prefill
    _set_tokens(tap, mask_BS.reshape(-1).bool(), sample_rate, generator, device)
    out = model(input_ids=input_ids_BS.to(device), attention_mask=mask_BS.to(device),
                position_ids=position_ids_BS.to(device), use_cache=max_tokens > 1, logits_to_keep=1)
    routed = int(mask_BS.sum())
    # 2. decode: feed back each greedy token but the last
    for _ in range(max_tokens - 1):
        next_ids_B1 = out.logits[:, -1].argmax(-1, keepdim=True)
        mask_BS = torch.cat([mask_BS, torch.ones(B, 1, dtype=torch.int64)], dim=1)
        position_ids_BS = position_ids_BS[:, -1:] + 1
        _set_tokens(tap, torch.ones(B, dtype=torch.bool), sample_rate, generator, device)
        out = model(input_ids=next_ids_B1, attention_mask=mask_BS.to(device), position_ids=position_ids_BS.to(device),
                    use_cache=True, logits_to_keep=1, **{cache_arg: getattr(out, cache_arg)})
        routed += B
    return routed


def _set_tokens(tap: _RouterTap, valid_N: torch.Tensor, sample_rate: float, generator: torch.Generator,
                device: torch.device) -> None:
    """Tell the tap which tokens of the next forward are real, and which of them to sample."""
    tap.valid_N = valid_N.to(device)
    if sample_rate > 0:
        # Drawn on the CPU from a seeded generator: the same tokens are sampled on every device.
        sample_N = valid_N & (torch.rand(valid_N.shape, generator=generator) < sample_rate)
        tap.sample_N = sample_N.to(device)
