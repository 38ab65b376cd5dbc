"""Workloads (scenarios) for the solver, from one or more traces.

Every window of every trace is a workload, normalised so that each workload's layer row sums to 1:
a large recording must not outweigh a small one, since the placement should hold for each. Traces
with many short windows are merged into at most `max_workloads` consecutive groups per trace
because a short window's counts are mostly sampling noise, and planning for the worst of noisy
windows chases the noise instead of the workload.
"""

from __future__ import annotations

import numpy as np

from moeplace.trace import Trace


def check_compatible(traces: list[Trace]) -> None:
    """All traces must describe the same model layers and experts."""
    first = traces[0]
    for t in traces[1:]:
        if t.num_experts != first.num_experts:
            raise ValueError(f"{t.source}: has {t.num_experts} experts, but {first.source} has {first.num_experts}")
        if not np.array_equal(t.layers, first.layers):
            raise ValueError(
                f"{t.source}: MoE layers {_span(t.layers)} differ from {first.source}'s {_span(first.layers)}"
            )


def workload_shares(traces: list[Trace], max_workloads: int = 32) -> tuple[np.ndarray, list[str]]:
    """share_WLE [W, L, E] (each row sums to 1) and a name per workload."""
    check_compatible(traces)
    per_trace = max(1, max_workloads // len(traces))
    shares, names = [], []
    for trace in traces:
        counts_WLE, labels = _merge_windows(trace, per_trace)
        totals_WL = counts_WLE.sum(axis=2)
        keep = (totals_WL > 0).all(axis=1)  # an idle window says nothing about the load
        if not keep.any():
            raise ValueError(f"{trace.source}: every window has a layer with no routed tokens")
        shares.append(counts_WLE[keep] / totals_WL[keep][:, :, None])
        names += [f"{_label(trace)}{lab}" for lab, k in zip(labels, keep) if k]
    return np.concatenate(shares), names


def _merge_windows(trace: Trace, limit: int) -> tuple[np.ndarray, list[str]]:
    W = trace.num_windows
    if W <= limit:
        labels = [""] if W == 1 else [f"[{w}]" for w in range(W)]
        return trace.counts_WLE, labels
    bounds = np.linspace(0, W, limit + 1).round().astype(int)
    merged = np.stack([trace.counts_WLE[a:b].sum(0) for a, b in zip(bounds[:-1], bounds[1:])])
    return merged, [f"[{a}:{b}]" for a, b in zip(bounds[:-1], bounds[1:])]


def _label(trace: Trace) -> str:
    return trace.source.rsplit("/", 1)[-1]


def _span(layers: np.ndarray) -> str:
    return f"{int(layers[0])}..{int(layers[-1])} ({len(layers)} layers)"


def routing_groups(trace: Trace) -> np.ndarray | None:
    """[E] routing group of each expert when the model routes group-limited (DeepSeek-V3), else None."""
    if trace.n_group <= 1:
        return None
    return np.arange(trace.num_experts) // (trace.num_experts // trace.n_group)


def token_samples(traces: list[Trace]) -> np.ndarray | None:
    """[T, L, K] every trace's sampled per-token top-k, concatenated; None when no trace has samples."""
    samples = [t.topk_ids_TLK for t in traces if t.topk_ids_TLK is not None and len(t.topk_ids_TLK)]
    if not samples or len({s.shape[2] for s in samples}) > 1:
        return None
    return np.concatenate(samples)
