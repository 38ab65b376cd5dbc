"""SGLang expert-distribution dumps -> `Trace` (one file; `moeplace.profiler.sglang` merges ranks).

Separate from `moeplace.readers`, which picks the reader by path and builds the `Trace`, so that each
engine's format and its description live together. Dimension letters as in `moeplace.readers`.

What the engines write (read in their sources, summarised here in our words):

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
"""

from __future__ import annotations

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
