"""Trace readers: moeplace's own trace files and the expert-load dumps of SGLang and TensorRT-LLM.

`load_trace(path)` picks the reader from the path; every malformed input is a `ValueError` naming
the file and the field. Dimension letters as in `moeplace.trace`; R = layer rows as dumped (before
the dense rows are dropped), P = physical expert slots.

Each engine's format has its own module, which describes it: `moeplace.sglang_dump` (SGLang
expert-distribution dumps), `moeplace.trtllm` (TensorRT-LLM expert statistic folders, slot-id folding).
This module chooses among them and turns raw counts into a `Trace` (`_build_trace`, shared by all).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_positive_int
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
        from moeplace.sglang_dump import read_sglang_dump  # it builds on this module's _build_trace

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
