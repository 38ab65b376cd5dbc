"""Cross-node traffic as DeepEP's inter-node dispatch pays it: the expected number of distinct
remote nodes a token is sent to (nodes other than its source rank's that serve one of its experts).

Tokens: a trace's per-token samples when it has them; otherwise tokens drawn from the counts with
the model's group-limited routing (DeepSeek-V3: topk_group = 4 of n_group = 8 groups, then top_k = 8
experts among them). The draw picks groups without replacement with probability proportional to
their load, then experts inside the picked groups proportional to theirs (Gumbel top-k): a model of
the router's marginals, not of its scores, good enough to compare placements. Models without groups
draw top_k experts proportional to load.

Source ranks are uniform (DP attention). Under `equal` and `split` each (token, expert) picks a
replica independently by the shares; under `sglang-static` the source rank's table decides.
Dimension letters: T tokens, L layers, K top-k, E experts, N nodes, G source ranks, P slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.placement import Placement
from moeplace.trace import Trace

TOKENS = 2000  # tokens per layer: the expectation's sampling error is ~1% of its value


@dataclass(frozen=True)
class TokenSample:
    """topk_ids_TLK [T, L, K] int64 logical experts (-1 = none) and where they came from."""

    topk_ids_TLK: np.ndarray
    source: str  # "samples" | "group-limited model" | "top-k model"


def token_sample(trace: Trace, rows: np.ndarray, tokens: int = TOKENS, seed: int = 0) -> TokenSample:
    """Tokens of the trace's layer rows `rows`: its samples (at most `tokens`), else drawn from its counts."""
    rng = np.random.default_rng(seed)
    if trace.topk_ids_TLK is not None and len(trace.topk_ids_TLK):
        ids = trace.topk_ids_TLK[:, rows]
        if len(ids) > tokens:
            ids = ids[np.sort(rng.choice(len(ids), tokens, replace=False))]
        return TokenSample(ids, "samples")
    groups = trace.n_group if trace.n_group > 1 else 1
    picked = trace.topk_group if groups > 1 else 1
    load_LE = trace.counts_WLE[:, rows].sum(axis=0)
    ids = np.stack([_draw_layer(load_E, groups, picked, trace.top_k, tokens, rng) for load_E in load_LE], axis=1)
    return TokenSample(ids, "group-limited model" if groups > 1 else "top-k model")


def draw_tokens(traces: list[Trace], load_LE: np.ndarray, tokens: int = TOKENS) -> np.ndarray:
    """[T, L, K] tokens for the solver's report: the traces' samples when one has them (all layers
    alike), else drawn from load_LE [L, E] with the first trace's routing groups."""
    first = traces[0]
    rows = np.arange(first.num_layers)
    sampled = [t for t in traces if t.topk_ids_TLK is not None and len(t.topk_ids_TLK)]
    if sampled:
        return token_sample(sampled[0], rows, tokens).topk_ids_TLK
    merged = Trace(load_LE[None], first.layers, first.top_k, n_group=first.n_group, topk_group=first.topk_group)
    return token_sample(merged, rows, tokens).topk_ids_TLK


def _draw_layer(load_E: np.ndarray, groups: int, picked: int, top_k: int, tokens: int,
                rng: np.random.Generator) -> np.ndarray:
    """[T, K] experts drawn by group-limited routing from one layer's loads (rules in the module doc)."""
    E = len(load_E)
    with np.errstate(divide="ignore"):
        log_E = np.log(np.maximum(load_E, 0) / max(load_E.sum(), 1e-300))
    group_E = np.arange(E) // (E // groups)
    log_J = np.log(np.maximum(np.bincount(group_E, weights=load_E, minlength=groups), 1e-300))
    keys_TJ = log_J + rng.gumbel(size=(tokens, groups))
    chosen_TJ = np.zeros((tokens, groups), dtype=bool)
    np.put_along_axis(chosen_TJ, np.argsort(-keys_TJ, axis=1)[:, :picked], True, axis=1)
    keys_TE = np.where(chosen_TJ[:, group_E], log_E + rng.gumbel(size=(tokens, E)), -np.inf)
    ids_TK = np.argsort(-keys_TE, axis=1)[:, :top_k]
    return np.where(np.isfinite(np.take_along_axis(keys_TE, ids_TK, axis=1)), ids_TK, -1)


def remote_nodes_L(placement: Placement, ids_TLK: np.ndarray, shares_LP: np.ndarray,
                   choice_GLE: np.ndarray | None = None) -> np.ndarray:
    """[L] expected distinct remote nodes per token. shares_LP [L, P]: each slot's share of its
    expert; choice_GLE [G, L, E]: the slot each source rank sends each expert to (static dispatch),
    or None for independent picks by the shares."""
    if choice_GLE is not None:
        return _remote_static(placement, ids_TLK, choice_GLE)
    topo = placement.topology
    N = topo.num_nodes
    node_P = np.arange(topo.num_slots) // (topo.slots_per_gpu * topo.gpus_per_node)
    out = np.zeros(placement.num_layers)
    for l in range(placement.num_layers):
        on_EN = np.zeros((placement.num_experts + 1, N))  # row E: "no expert", never on a node
        np.add.at(on_EN, (placement.phy2log_LP[l], node_P), shares_LP[l])
        ids = np.where(ids_TLK[:, l] >= 0, ids_TLK[:, l], placement.num_experts)
        visited_TN = 1.0 - np.prod(1.0 - on_EN[ids], axis=1)  # [T, N] P(node n serves the token)
        # a source node is any of the N with equal probability: the other N - 1 are remote
        out[l] = visited_TN.sum(axis=1).mean() * (N - 1) / N if len(ids) else 0.0
    return out


def _remote_static(placement: Placement, ids_TLK: np.ndarray, choice_GLE: np.ndarray) -> np.ndarray:
    topo = placement.topology
    node_slots = topo.slots_per_gpu * topo.gpus_per_node
    node_G = np.arange(topo.num_gpus) // topo.gpus_per_node
    out = np.zeros(placement.num_layers)
    for l in range(placement.num_layers):
        ids = ids_TLK[:, l]
        if not len(ids):
            continue
        node_GTK = choice_GLE[:, l][:, np.maximum(ids, 0)] // node_slots
        bits_GTK = np.where(ids[None] >= 0, np.left_shift(1, node_GTK), 0)
        mask_GT = np.bitwise_or.reduce(bits_GTK, axis=2) & ~np.left_shift(1, node_G)[:, None]
        out[l] = _popcount(mask_GT).mean()
    return out


def _popcount(mask: np.ndarray) -> np.ndarray:
    count = np.zeros(mask.shape, dtype=np.int64)
    while mask.any():
        count += mask & 1
        mask = mask >> 1
    return count
