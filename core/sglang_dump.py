"""SGLang expert-distribution dumps -> `Trace`: one file, or the per-rank files of one dump.

Separate from `moeplace.readers`, which picks the reader by path and builds the `Trace`, so that each
engine's format and its description live together. Dimension letters as in `moeplace.readers`.

What SGLang writes (read in its sources, summarised here in our words):

SGLang, sgl-project/sglang `python/sglang/srt/eplb/expert_distribution.py` (commit 02295fe5):
- modes `stat` / `stat_approx`: `_StatAccumulator.dump` torch.saves, on rank 0 only,
  `expert_distribution_recorder_{time}.pt` = {rank: int, logical_count: int32 [steps, R, E],
  average_utilization_rate_over_window: float | None}. Counts are already summed over ranks and
  folded from physical slots to logical experts. R counts every model layer (61 for DeepSeek-V3,
  dense layers 0..2 stay zero). With a recorder buffer size >= 0 the steps are a ring: unfilled
  steps are zero and the order is rotated (the write index is not dumped), so windows are not in
  time order; we drop all-zero windows.
- `python/sglang/srt/eplb/expert_location.py` (commit 01fec5c2), `--init-expert-location`: a `.pt`
  (torch.load weights_only) or `.json` dict with the same `logical_count`, 2-D [R, E] or 3-D. The
  published DeepSeek statistics (../shared/traces/sglang-dsv3-ep-statistics) are such JSON, [61, 256].
- modes `per_pass` / `per_token`: `_DetailAccumulator.dump` writes, on every rank,
  `expert_distribution_recorder_{time}_{rank}.pt` = {records: [...], last_physical_to_logical_map:
  [R, P]}. One record per forward pass with forward_pass_id, rank, gatherer_key and
  global_physical_count [R, P] (this rank's tokens only); `per_token` adds input_ids, positions,
  extend_seq_lens, forward_mode, misc_objects and topk_ids_of_layer int32 [R, T, 8] (-1 = unused;
  8 slots whatever the model's top-k). Those ids are physical slots: `select_experts` in
  `python/sglang/srt/layers/moe/topk.py` maps logical to physical before it calls the recorder.
  We fold them back through last_physical_to_logical_map, exact unless EPLB moved experts during
  the recording (SGLang itself calls the map "last"). A file holds one rank's passes; we read one.

Merging per-rank files: a window is one forward pass; records of different ranks with the same
`forward_pass_id` (each rank's scheduler counts its passes, and the ranks of an EP deployment step
together) are taken as one step: counts summed over ranks, per-token samples concatenated. When every rank
holds identical records, the ranks saw the same tokens (tensor-parallel MoE routes every token on every
rank) and one rank is read, so tokens are not counted tp_size times.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_range
from moeplace.rawfields import _load_dict, _numeric
from moeplace.readers import _build_trace
from moeplace.trace import Trace


def read_sglang_dump(path: str | Path, *, num_model_layers: int | None = None, top_k: int | None = None) -> Trace:
    """Read an SGLang expert-distribution dump: `stat` (`logical_count`) or `per_pass`/`per_token` (`records`)."""
    path = Path(path)
    data = _load_dict(path)
    if "logical_count" in data:
        counts = _numeric(str(path), "logical_count", data["logical_count"])
        if counts.ndim not in (2, 3):
            raise ValueError(
                f"{path}: field 'logical_count' must be [layers, experts] or [windows, layers, experts], "
                f"got shape {list(counts.shape)}"
            )
        counts = check_counts(str(path), "logical_count", counts)
        counts = counts[None] if counts.ndim == 2 else counts
        meta = {"engine": "sglang", "format": "sglang expert_distribution stat dump"}
        return _build_trace(path, counts, meta, num_model_layers=num_model_layers, top_k=top_k)
    if "records" in data:
        return _read_sglang_records(path, data, num_model_layers, top_k)
    keys = sorted(str(k) for k in data)[:8]
    raise ValueError(f"{path}: key 'logical_count' is missing (found keys {keys}); not an SGLang expert-distribution dump")


def _read_sglang_records(path: Path, data: dict, num_model_layers: int | None, top_k: int | None) -> Trace:
    src = str(path)
    records = data["records"]
    if not isinstance(records, list) or not records:
        raise ValueError(f"{src}: field 'records' must be a non-empty list of forward passes")
    if "last_physical_to_logical_map" not in data:
        raise ValueError(f"{src}: key 'last_physical_to_logical_map' is missing")
    p2l_RP = check_array(src, "last_physical_to_logical_map", _numeric(src, "last_physical_to_logical_map",
                         data["last_physical_to_logical_map"]), ndim=2, kind="i")
    if p2l_RP.size == 0:
        raise ValueError(f"{src}: field 'last_physical_to_logical_map' is empty, shape {list(p2l_RP.shape)}")
    check_range(src, "last_physical_to_logical_map", p2l_RP, 0, p2l_RP.shape[1])
    num_experts = int(p2l_RP.max()) + 1  # every logical expert has at least one slot
    counts, topk, names = [], [], []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "global_physical_count" not in record:
            raise ValueError(f"{src}: records[{i}] has no 'global_physical_count'")
        field = f"records[{i}].global_physical_count"
        counts.append(_fold_physical(src, field, record["global_physical_count"], p2l_RP, num_experts))
        if "topk_ids_of_layer" in record:
            topk.append(_fold_topk(src, f"records[{i}].topk_ids_of_layer", record["topk_ids_of_layer"], p2l_RP))
        names.append(str(record.get("forward_pass_id", i)))
    if topk and len(topk) != len(records):
        raise ValueError(f"{src}: only {len(topk)} of {len(records)} records have 'topk_ids_of_layer'")
    mode = "per_token" if topk else "per_pass"
    meta = {"engine": "sglang", "format": f"sglang expert_distribution {mode} dump",
            "rank": str(records[0].get("rank", ""))}
    topk_ids = np.concatenate(topk, axis=0) if topk else None
    tokens = np.array([t.shape[0] for t in topk], dtype=np.float64) if topk else None
    return _build_trace(path, np.stack(counts), meta, window_names=names, topk_ids_TRK=topk_ids, tokens_W=tokens,
                        num_model_layers=num_model_layers, top_k=top_k)


def _fold_physical(src: str, field: str, value: object, p2l_RP: np.ndarray, num_experts: int) -> np.ndarray:
    """Physical-slot counts [R, P] → logical-expert counts [R, E] (replicas summed)."""
    phys_RP = check_array(src, field, _numeric(src, field, value), ndim=2, kind="f", shape=p2l_RP.shape)
    phys_RP = check_counts(src, field, phys_RP)
    logical_RE = np.zeros((p2l_RP.shape[0], num_experts))
    np.add.at(logical_RE, (np.arange(p2l_RP.shape[0])[:, None], p2l_RP), phys_RP)
    return logical_RE


def _fold_topk(src: str, field: str, value: object, p2l_RP: np.ndarray) -> np.ndarray:
    """Physical top-k ids [R, T, K] → logical ids [T, R, K], -1 kept."""
    ids_RTK = check_array(src, field, _numeric(src, field, value), ndim=3, kind="i", shape=(p2l_RP.shape[0], None, None))
    check_range(src, field, ids_RTK, -1, p2l_RP.shape[1])
    logical = p2l_RP[np.arange(p2l_RP.shape[0])[:, None, None], np.maximum(ids_RTK, 0)]
    return np.where(ids_RTK >= 0, logical, -1).transpose(1, 0, 2)


def read_sglang_rank_dumps(paths: list[Path], *, top_k: int | None = None) -> Trace:
    """Read the per-rank files of one SGLang per_pass/per_token dump as one trace (one window per pass).

    top_k defaults to the most top-k slots any token used (SGLang pads every token to 8 slots with -1).
    """
    assert paths, "no files to read"
    # 1. per file: fold every record to logical experts, keyed by forward pass
    per_rank, p2l_RP = [], None
    for path in paths:
        passes, file_p2l = _rank_passes(path)
        if p2l_RP is not None and not np.array_equal(file_p2l, p2l_RP):
            raise ValueError(f"{path}: last_physical_to_logical_map differs from that of {paths[0].name}")
        p2l_RP = file_p2l
        per_rank.append(passes)
    # 2. ranks that saw the same tokens are one observation, not several
    notes = []
    if len(per_rank) > 1 and all(_same_passes(per_rank[0], other) for other in per_rank[1:]):
        notes.append(f"the {len(per_rank)} ranks hold identical records (every rank routed every token); read once")
        per_rank = per_rank[:1]
    # 3. merge: sum counts over ranks per pass, concatenate the per-token samples
    pass_ids = sorted(set().union(*per_rank))
    if not pass_ids:
        raise ValueError(f"{paths[0].parent}: the dump holds no forward passes; was the server idle while recording?")
    counts_WRE = np.stack([sum(rank[p][0] for rank in per_rank if p in rank) for p in pass_ids])
    with_topk = {rank[p][1] is not None for rank in per_rank for p in rank}
    if len(with_topk) > 1:
        raise ValueError(f"{paths[0].parent}: some records have 'topk_ids_of_layer' and some do not")
    topk_TRK = tokens_W = None
    if with_topk == {True}:
        samples = [[rank[p][1] for rank in per_rank if p in rank] for p in pass_ids]
        tokens_W = np.array([sum(s.shape[0] for s in pass_samples) for pass_samples in samples], dtype=np.float64)
        topk_TRK = np.concatenate([s for pass_samples in samples for s in pass_samples], axis=0)
        if top_k is None and topk_TRK.size:
            top_k = max(int((topk_TRK >= 0).sum(axis=2).max()), 1)
    mode = "per_token" if topk_TRK is not None else "per_pass"
    meta = {"engine": "sglang", "format": f"sglang expert_distribution {mode} dump", "ranks": str(len(paths))}
    source = paths[0] if len(paths) == 1 else paths[0].parent
    trace = _build_trace(source, counts_WRE, meta, window_names=[str(p) for p in pass_ids],
                         topk_ids_TRK=topk_TRK, tokens_W=tokens_W, top_k=top_k)
    if notes:  # _build_trace writes its own notes (dropped windows) into metadata["notes"]
        notes += [trace.metadata["notes"]] if "notes" in trace.metadata else []
        trace = replace(trace, metadata=dict(trace.metadata, notes="; ".join(notes)))
    return trace


def _rank_passes(path: Path) -> tuple[dict[int, tuple[np.ndarray, np.ndarray | None]], np.ndarray]:
    """One rank file → ({forward_pass_id: (logical counts [R, E], logical top-k [T, R, K] or None)}, map [R, P])."""
    src = str(path)
    data = _load_dict(path)
    for key in ("records", "last_physical_to_logical_map"):
        if key not in data:
            raise ValueError(f"{src}: key '{key}' is missing; not an SGLang per_pass/per_token dump")
    records = data["records"]
    if not isinstance(records, list):
        raise ValueError(f"{src}: field 'records' must be a list of forward passes, got {type(records).__name__}")
    field = "last_physical_to_logical_map"
    p2l_RP = check_array(src, field, _numeric(src, field, data[field]), ndim=2, kind="i")
    check_range(src, field, p2l_RP, 0, p2l_RP.shape[1])
    num_experts = int(p2l_RP.max()) + 1 if p2l_RP.size else 0  # every logical expert has a slot
    passes: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "global_physical_count" not in record:
            raise ValueError(f"{src}: records[{i}] has no 'global_physical_count'")
        pass_id = record.get("forward_pass_id", i)
        if isinstance(pass_id, bool) or not isinstance(pass_id, int):
            raise ValueError(f"{src}: records[{i}].forward_pass_id must be an integer, got {pass_id!r}")
        counts_RE = _fold_physical(src, f"records[{i}].global_physical_count", record["global_physical_count"],
                                   p2l_RP, num_experts)
        topk_TRK = None
        if "topk_ids_of_layer" in record:
            topk_TRK = _fold_topk(src, f"records[{i}].topk_ids_of_layer", record["topk_ids_of_layer"], p2l_RP)
        if pass_id in passes:  # one pass split over several gatherers: add them up
            old_counts, old_topk = passes[pass_id]
            counts_RE = counts_RE + old_counts
            topk_TRK = None if topk_TRK is None or old_topk is None else np.concatenate([old_topk, topk_TRK])
        passes[pass_id] = (counts_RE, topk_TRK)
    return passes, p2l_RP


def _same_passes(a: dict, b: dict) -> bool:
    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    return a.keys() == b.keys() and all(same(a[p][0], b[p][0]) and same(a[p][1], b[p][1]) for p in a)
