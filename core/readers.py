"""Trace readers: moeplace's own trace files and the expert-load dumps of SGLang and TensorRT-LLM.

`load_trace(path)` picks the reader from the path; every malformed input is a `ValueError` naming
the file and the field. Dimension letters as in `moeplace.trace`; R = layer rows as dumped (before
the dense rows are dropped), P = physical expert slots.

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

TensorRT-LLM expert statistic folders: `moeplace.trtllm` (their format, and slot-id folding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_positive_int, check_range
from moeplace.trace import TRACE_FORMAT, Trace, _safetensors_metadata, load_native_trace

DEEPSEEK_V3_GUESS = "deepseek-v3-family (inferred from shape)"
_TRTLLM_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")


@dataclass(frozen=True)
class LayerMap:
    """Which dumped rows are MoE layers, and their model layer ids.

    rows:   [L] int64 indices into the dump's layer axis.
    layers: [L] int64 model layer ids, increasing.
    num_model_layers: layers of the whole model, dense ones included.
    """

    rows: np.ndarray
    layers: np.ndarray
    num_model_layers: int


def load_trace(path: str | Path, *, num_model_layers: int | None = None, top_k: int | None = None,
               trtllm_config: str | Path | None = None) -> Trace:
    """Read a trace, choosing the reader by the path.

    `.safetensors`: moeplace trace file. `.json` / `.pt`: SGLang expert-distribution dump. A folder
    (or its `meta_info.json`): TensorRT-LLM expert statistic. `num_model_layers` places dumps of MoE
    rows only (vLLM style); `top_k` is needed for count-only dumps of shapes not recognised;
    `trtllm_config`: TensorRT-LLM's load-balancer YAML, to fold statistics of slot ids to experts.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir() or path.name == "meta_info.json":
        from moeplace.trtllm import read_trtllm_statistic  # it builds on this module's helpers

        return read_trtllm_statistic(path if path.is_dir() else path.parent, num_model_layers=num_model_layers,
                                     trtllm_config=trtllm_config)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_native(path)
    if suffix in (".json", ".pt"):
        return read_sglang_dump(path, num_model_layers=num_model_layers, top_k=top_k)
    raise ValueError(
        f"{path}: unknown trace format '{suffix or path.name}' "
        "(expected .safetensors, SGLang .json/.pt, or a TensorRT-LLM statistic folder)"
    )


def normalize_layers(
    counts_WLE: np.ndarray,
    layer_ids: np.ndarray | list[int] | None = None,
    num_model_layers: int | None = None,
    *,
    source: str = "counts",
) -> LayerMap:
    """Map the R rows of `counts_WLE` [W, R, E] to model layer ids, in the three numberings met:

    - `layer_ids` given (TensorRT-LLM absolute ids such as 3..60): rows sorted by id.
    - R == num_model_layers, or num_model_layers unknown (SGLang, one row per model layer): rows
      zero in every window are dense layers and are dropped; ids are row indices.
    - R < num_model_layers (vLLM / EPLB, MoE rows only): the MoE layers are the model's last R.
    """
    R = counts_WLE.shape[1]
    if R == 0:
        raise ValueError(f"{source}: zero layer rows, shape {list(counts_WLE.shape)}")
    if num_model_layers is not None:
        num_model_layers = check_positive_int(source, "num_model_layers", num_model_layers)
    if layer_ids is not None:
        ids = np.asarray(layer_ids, dtype=np.int64)
        if ids.shape != (R,):
            raise ValueError(f"{source}: {ids.size} layer ids for {R} layer rows")
        return _absolute_layers(ids, num_model_layers, source)
    if num_model_layers is None or R == num_model_layers:
        rows = np.flatnonzero(counts_WLE.sum(axis=(0, 2)) > 0)
        if rows.size == 0:
            raise ValueError(f"{source}: all {R} layer rows are zero, so no MoE layer was recorded")
        return LayerMap(rows, rows.copy(), R)
    if R > num_model_layers:
        raise ValueError(f"{source}: {R} layer rows, more than num_model_layers {num_model_layers}")
    return LayerMap(np.arange(R), np.arange(num_model_layers - R, num_model_layers), num_model_layers)


def _absolute_layers(ids: np.ndarray, num_model_layers: int | None, source: str) -> LayerMap:
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids[0] < 0 or (np.diff(ids) == 0).any():
        raise ValueError(f"{source}: layer ids must be distinct and non-negative, got {ids.tolist()}")
    n = int(ids[-1]) + 1 if num_model_layers is None else num_model_layers
    if ids[-1] >= n:
        raise ValueError(f"{source}: layer id {int(ids[-1])} is not below num_model_layers {n}")
    return LayerMap(order, ids, n)


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


def _build_trace(
    path: Path,
    counts_WRE: np.ndarray,
    metadata: dict[str, str],
    *,
    window_names: list[str] | None = None,
    layer_ids: list[int] | None = None,
    topk_ids_TRK: np.ndarray | None = None,
    tokens_W: np.ndarray | None = None,
    num_model_layers: int | None = None,
    top_k: int | None = None,
) -> Trace:
    """Validate raw counts, place their rows, infer what the shape tells, and build the `Trace`."""
    src = str(path)
    counts_WRE = check_counts(src, "counts", check_array(src, "counts", counts_WRE, ndim=3, kind="f"))
    W, R, E = counts_WRE.shape
    if W == 0 or R == 0 or E == 0:
        raise ValueError(f"{src}: counts are empty, shape {list(counts_WRE.shape)}")
    notes = []
    if num_model_layers is None and layer_ids is None and (R, E) == (58, 256):
        num_model_layers = 61  # DeepSeek-V3's 58 MoE rows without the 3 dense ones (vLLM / EPLB style)
        notes.append("58 MoE rows placed as layers 3..60 of a 61-layer model (inferred from shape)")
    layer_map = normalize_layers(counts_WRE, layer_ids, num_model_layers, source=src)
    kept = np.flatnonzero(counts_WRE.sum(axis=(1, 2)) > 0)
    if kept.size == 0:
        raise ValueError(f"{src}: every window is all zero, no routed tokens were recorded")
    if kept.size < W:
        notes.append(f"{W - kept.size} all-zero windows dropped")
    deepseek = layer_map.num_model_layers == 61 and E == 256
    top_k = _choose_top_k(src, top_k, topk_ids_TRK, deepseek)
    if topk_ids_TRK is not None:
        topk_ids_TRK = _trim_topk(src, topk_ids_TRK, top_k)[:, layer_map.rows]
    if window_names is not None:
        metadata["window_names"] = json.dumps([window_names[w] for w in kept])
    if notes:
        metadata["notes"] = "; ".join(notes)
    metadata.update(model=DEEPSEEK_V3_GUESS if deepseek else "unknown", source=path.name)
    return Trace(
        counts_WLE=counts_WRE[kept][:, layer_map.rows],
        layers=layer_map.layers,
        top_k=top_k,
        topk_ids_TLK=topk_ids_TRK,
        tokens_W=None if tokens_W is None else tokens_W[kept],
        num_model_layers=layer_map.num_model_layers,
        n_group=8 if deepseek else 1,
        topk_group=4 if deepseek else 1,
        metadata=metadata,
        source=src,
    )


def _choose_top_k(src: str, top_k: int | None, topk_ids_TRK: np.ndarray | None, deepseek: bool) -> int:
    if top_k is not None:
        return check_positive_int(src, "top_k", top_k)
    if topk_ids_TRK is not None:
        return topk_ids_TRK.shape[2]
    if deepseek:
        return 8
    raise ValueError(f"{src}: the dump does not say the model's top_k and its shape is not recognised; pass top_k")


def _trim_topk(src: str, ids_TRK: np.ndarray, top_k: int) -> np.ndarray:
    """SGLang records 8 slots whatever the model's top-k; slots past top_k must be unused (-1)."""
    if top_k > ids_TRK.shape[2]:
        raise ValueError(f"{src}: top_k {top_k} exceeds the {ids_TRK.shape[2]} recorded top-k slots")
    if (ids_TRK[:, :, top_k:] != -1).any():
        raise ValueError(f"{src}: top_k {top_k} given, but tokens use more top-k slots than that")
    return ids_TRK[:, :, :top_k]


def _read_native(path: Path) -> Trace:
    meta = _safetensors_metadata(path.read_bytes(), str(path))
    if meta.get("format") != TRACE_FORMAT:
        hint = " (a TensorRT-LLM rank file: pass its folder)" if _TRTLLM_RANK_FILE.fullmatch(path.name) else ""
        raise ValueError(
            f"{path}: safetensors file without moeplace trace metadata "
            f"('format' is {meta.get('format')!r}), so not a trace{hint}"
        )
    return load_native_trace(path)


def _load_dict(path: Path) -> dict:
    data = _read_json(path) if path.suffix.lower() == ".json" else _torch_load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with key 'logical_count' or 'records', got {type(data).__name__}")
    return data


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None


def _torch_load(path: Path) -> object:
    import torch  # here, not at the top: the placer must start without torch

    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused, never built.
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise ValueError(f"{path}: refused: it pickles {refused.group(1)}, which is not a tensor or plain data") from None
        raise ValueError(f"{path}: not a readable torch file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _tensor_values(src: str, field: str, value: object) -> object:
    """A dense torch tensor's values as numpy; other torch objects are returned unchanged (then refused)."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    if value.layout != torch.strided or value.is_nested or value.is_quantized:
        kind = "nested" if value.is_nested else "quantized" if value.is_quantized else str(value.layout)
        raise ValueError(f"{src}: field '{field}' must be a plain dense tensor, got a {kind} tensor")
    # A pickled view may repeat a small storage many times (stride 0): a file of a few hundred bytes
    # could otherwise claim [10^5, 61, 256] and cost gigabytes. Its values must be stored in the file.
    stored = value.untyped_storage().nbytes() // max(value.element_size(), 1)
    if value.numel() > stored:
        raise ValueError(f"{src}: field '{field}' has shape {list(value.shape)} ({value.numel()} values) "
                         f"but the file stores only {stored}")
    tensor = value.detach().cpu()
    if tensor.is_complex():
        raise ValueError(f"{src}: field '{field}' must hold real numbers, got {tensor.dtype} values")
    return (tensor.double() if tensor.is_floating_point() else tensor).numpy()  # numpy has no bfloat16


def _numeric(src: str, field: str, value: object) -> np.ndarray:
    """A torch tensor or nested list as a numeric numpy array; ragged lists and non-numbers refused."""
    if type(value).__module__.startswith("torch"):
        value = _tensor_values(src, field, value)
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses nested lists of unequal lengths
        raise ValueError(f"{src}: field '{field}' is ragged (nested lists of unequal lengths)") from None
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{src}: field '{field}' must hold numbers, got {array.dtype} values")
    return array
