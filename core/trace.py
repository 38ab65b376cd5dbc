"""`Trace`: recorded expert load of an MoE model, and moeplace's own trace file (`.safetensors`).

Dimension letters: W windows (or workloads), L MoE layers, E logical experts, T sampled tokens,
K top-k. A trace file stores the arrays as tensors and everything else as string metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_layers, check_positive_int, check_range
from moeplace.fileio import atomic_write_bytes

TRACE_FORMAT = "moeplace.trace"
TRACE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Trace:
    """Tokens routed to each logical expert, per window and MoE layer.

    counts_WLE:   [W, L, E] float64 >= 0, (token, top-k slot) assignments per expert.
    layers:       [L] int64, the model layer id of each row (e.g. 3..60 for DeepSeek-V3), increasing.
    top_k:        experts selected per token.
    topk_ids_TLK: optional [T, L, K] int sample of per-token selections; -1 means no selection.
    tokens_W:     optional [W] tokens seen per window.
    time_W:       optional [W] window start, seconds since the epoch.
    num_model_layers: layers of the whole model (dense ones included), if known.
    n_group, topk_group: the model's group-limited routing (DeepSeek-V3: 8 and 4; 1, 1 = none).
    metadata:     free-form strings: model, engine, source, window names, notes.
    """

    counts_WLE: np.ndarray
    layers: np.ndarray
    top_k: int
    topk_ids_TLK: np.ndarray | None = None
    tokens_W: np.ndarray | None = None
    time_W: np.ndarray | None = None
    num_model_layers: int | None = None
    n_group: int = 1
    topk_group: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "Trace"

    def __post_init__(self) -> None:
        src = self.source
        counts = check_array(src, "counts_WLE", self.counts_WLE, ndim=3, kind="f")
        counts = check_counts(src, "counts_WLE", counts)
        W, L, E = counts.shape
        if W == 0 or L == 0 or E == 0:
            raise ValueError(f"{src}: field 'counts_WLE' is empty, shape {list(counts.shape)}")
        object.__setattr__(self, "counts_WLE", counts)
        object.__setattr__(self, "layers", check_layers(src, self.layers, L, self.num_model_layers))
        top_k = check_positive_int(src, "top_k", self.top_k)
        if top_k > E:
            raise ValueError(f"{src}: field 'top_k' is {top_k}, more than the {E} experts")
        n_group = check_positive_int(src, "n_group", self.n_group)
        topk_group = check_positive_int(src, "topk_group", self.topk_group)
        if E % n_group or topk_group > n_group:
            raise ValueError(f"{src}: n_group {n_group} / topk_group {topk_group} do not fit {E} experts")
        if self.topk_ids_TLK is not None:
            ids = check_array(src, "topk_ids_TLK", self.topk_ids_TLK, ndim=3, kind="i", shape=(None, L, top_k))
            check_range(src, "topk_ids_TLK", ids, -1, E)
            object.__setattr__(self, "topk_ids_TLK", ids.astype(np.int64))
        for name in ("tokens_W", "time_W"):
            value = getattr(self, name)
            if value is not None:
                value = check_counts(src, name, check_array(src, name, value, ndim=1, kind="f", shape=(W,)))
                object.__setattr__(self, name, value)
        object.__setattr__(self, "metadata", {str(k): str(v) for k, v in self.metadata.items()})

    @property
    def num_windows(self) -> int:
        return self.counts_WLE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_WLE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_WLE.shape[2]

    def select_windows(self, windows: list[int], source: str | None = None) -> Trace:
        """A trace of the given windows only (per-token samples cannot be split by window: dropped)."""
        names = json.loads(self.metadata.get("window_names", "null")) or None
        metadata = dict(self.metadata)
        if names is not None and len(names) == self.num_windows:
            metadata["window_names"] = json.dumps([names[w] for w in windows])
        pick = lambda a: None if a is None else a[windows]  # noqa: E731
        return Trace(
            counts_WLE=self.counts_WLE[windows],
            layers=self.layers,
            top_k=self.top_k,
            tokens_W=pick(self.tokens_W),
            time_W=pick(self.time_W),
            num_model_layers=self.num_model_layers,
            n_group=self.n_group,
            topk_group=self.topk_group,
            metadata=metadata,
            source=source or self.source,
        )

    def digest(self) -> str:
        """Short content hash (counts and layer ids), recorded in a placement's provenance."""
        h = hashlib.sha256(self.counts_WLE.tobytes())
        h.update(self.layers.tobytes())
        return h.hexdigest()[:16]


def merge_traces(traces: list[Trace], source: str | None = None) -> Trace:
    """One trace whose windows are every trace's windows in order (named `<file stem>` or
    `<file stem>:<window name>`); per-token samples, tokens and times are kept when every trace has them.
    ValueError naming the first trace that describes another model (layers, experts, top-k, groups)."""
    first = traces[0]
    for t in traces[1:]:
        same = (t.num_experts, t.top_k, t.n_group, t.topk_group) == (
            first.num_experts, first.top_k, first.n_group, first.topk_group)
        if not same or not np.array_equal(t.layers, first.layers):
            raise ValueError(
                f"{t.source}: {t.num_experts} experts, top-{t.top_k}, layers {t.layers.tolist()[:4]}...: not the "
                f"model of {first.source} ({first.num_experts} experts, top-{first.top_k}, "
                f"layers {first.layers.tolist()[:4]}...)")
    names = [name for t in traces for name in _qualified_window_names(t)]
    both = lambda name: None if any(getattr(t, name) is None for t in traces) else (  # noqa: E731
        np.concatenate([getattr(t, name) for t in traces]))
    return Trace(
        counts_WLE=np.concatenate([t.counts_WLE for t in traces]),
        layers=first.layers,
        top_k=first.top_k,
        topk_ids_TLK=both("topk_ids_TLK"),
        tokens_W=both("tokens_W"),
        time_W=both("time_W"),
        num_model_layers=first.num_model_layers,
        n_group=first.n_group,
        topk_group=first.topk_group,
        metadata={**first.metadata, "window_names": json.dumps(names)},
        source=source or " + ".join(t.source for t in traces),
    )


def _qualified_window_names(trace: Trace) -> list[str]:
    stem = Path(trace.source).stem
    if trace.num_windows == 1:
        return [stem]
    try:
        names = json.loads(trace.metadata.get("window_names", "null"))
    except json.JSONDecodeError:  # free-form metadata: a bad value only costs the names
        names = None
    if not isinstance(names, list) or len(names) != trace.num_windows:
        names = [str(w) for w in range(trace.num_windows)]
    return [f"{stem}:{name}" for name in names]


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write `trace` as a moeplace `.safetensors` trace file (atomically)."""
    atomic_write_bytes(path, trace_to_bytes(trace))


def trace_to_bytes(trace: Trace) -> bytes:
    """The bytes of a moeplace `.safetensors` trace file."""
    from safetensors.numpy import save

    tensors = {"counts_WLE": trace.counts_WLE, "layers": trace.layers}
    for name in ("topk_ids_TLK", "tokens_W", "time_W"):
        value = getattr(trace, name)
        if value is not None:
            tensors[name] = np.ascontiguousarray(value)
    meta = {
        "format": TRACE_FORMAT,
        "format_version": str(TRACE_FORMAT_VERSION),
        "top_k": str(trace.top_k),
        "n_group": str(trace.n_group),
        "topk_group": str(trace.topk_group),
        "metadata": json.dumps(trace.metadata, sort_keys=True),
    }
    if trace.num_model_layers is not None:
        meta["num_model_layers"] = str(trace.num_model_layers)
    return save(tensors, metadata=meta)


def load_native_trace(path: str | Path) -> Trace:
    """Read a moeplace `.safetensors` trace file; `ValueError` naming the file and field otherwise."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    src = str(path)
    data = Path(path).read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, Exception) as exc:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{src}: not a readable safetensors file ({exc})") from None
    meta = _safetensors_metadata(data, src)
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{src}: metadata 'format' is {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
    version = _int_field(meta, "format_version", src)
    if version != TRACE_FORMAT_VERSION:
        raise ValueError(f"{src}: trace format_version {version} is not supported (this moeplace reads 1)")
    for required in ("counts_WLE", "layers"):
        if required not in tensors:
            raise ValueError(f"{src}: tensor '{required}' is missing")
    try:
        notes = json.loads(meta.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{src}: metadata 'metadata' is not JSON ({exc})") from None
    if not isinstance(notes, dict):
        raise ValueError(f"{src}: metadata 'metadata' must be a JSON object")
    nml = meta.get("num_model_layers")
    return Trace(
        counts_WLE=tensors["counts_WLE"],
        layers=tensors["layers"],
        top_k=_int_field(meta, "top_k", src),
        topk_ids_TLK=tensors.get("topk_ids_TLK"),
        tokens_W=tensors.get("tokens_W"),
        time_W=tensors.get("time_W"),
        num_model_layers=None if nml is None else _int_field(meta, "num_model_layers", src),
        n_group=_int_field(meta, "n_group", src, default=1),
        topk_group=_int_field(meta, "topk_group", src, default=1),
        metadata=notes,
        source=src,
    )


def _safetensors_metadata(data: bytes, src: str) -> dict[str, str]:
    """The `__metadata__` block of a safetensors header (safetensors.numpy does not return it)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{src}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{src}: safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{src}: safetensors '__metadata__' must map names to strings")
    return meta


def _int_field(meta: dict[str, str], name: str, src: str, default: int | None = None) -> int:
    if name not in meta:
        if default is not None:
            return default
        raise ValueError(f"{src}: metadata '{name}' is missing")
    try:
        return int(meta[name])
    except ValueError:
        raise ValueError(f"{src}: metadata '{name}' is {meta[name]!r}, not an integer") from None
