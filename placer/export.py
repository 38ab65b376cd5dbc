"""Export a `Placement` to the files inference engines read at start-up.

Dimension letters: L MoE layers of the placement, M model layers, E logical experts, P physical
slots, R replicas. Each format's layout was taken from the engine's own source:

- `sglang`: JSON `{"physical_to_logical_map": [M, P]}` for `--init-expert-location`.
  sgl-project/sglang `python/sglang/srt/eplb/expert_location.py`: `compute_initial_expert_location_metadata`
  passes the parsed object as `**kwargs` to `ExpertLocationMetadata.init_by_mapping`, so the file may
  hold no other key; rows are indexed by model layer (`num_layers = config.num_hidden_layers`, 61 for
  DeepSeek-V3), and `init_trivial` fills a layer with `p % E`, which we use for layers the placement
  lacks (dense layers 0..2 of DeepSeek-V3).
- `trtllm`: YAML for `moe_config.load_balancer` (NVIDIA/TensorRT-LLM `tensorrt_llm/llmapi/llm_args.py`
  `MoeLoadBalancerConfig`, a strict model: only `num_slots`, `initial_global_assignments`,
  `layer_updates_per_iter`). Assignments are keyed by the model layer id of the MoE module (3..60 for
  DeepSeek-R1, as `examples/ep_load_balancer/generate_eplb_config.py` and its README write them), each
  a list of P expert ids. `layer_updates_per_iter: 0` keeps the placement static (offline EPLB).
- `vllm` (informational: vLLM 0.33.0 cannot load a placement; its EPLB starts from the trivial layout
  and re-plans itself, `vllm/distributed/eplb/eplb_state.py`): `.safetensors` with vLLM's EPLB state (vllm-project/vllm `vllm/distributed/eplb/eplb_state.py`):
  `physical_to_logical_map` [L, P], `logical_to_physical_map` [L, E, P - E + 1] (-1 = no replica, the
  documented `num_redundant_experts + 1` width), `logical_replica_count` [L, E]; int64, rows are MoE
  layers only.
- `eplb`: `.safetensors` with the three tensors deepseek-ai/EPLB `eplb.py` `rebalance_experts` returns:
  `phy2log` [L, P], `log2phy` [L, E, R] with R = max replica count, `logcnt` [L, E]; int64.

The safetensors files carry the model layer ids, topology and provenance as string metadata; the
JSON and YAML files carry nothing the engines would reject (the YAML has a comment header).
Replicas in the logical-to-physical maps are listed in slot order. None of the formats has a field
for per-replica token shares, so a placement's `split_LP` is not exported (each engine splits an
expert's tokens over its replicas by its own rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_save

from moeplace import __version__
from moeplace.fileio import atomic_write_bytes
from moeplace.placement import Placement

FORMATS = ("sglang", "trtllm", "vllm", "eplb")
SGLANG_EPLB_WARNING = (
    "do not start SGLang with --enable-eplb: its EPLB replaces this placement with its own after "
    "--eplb-rebalance-num-iterations forward passes (1000 by default)")
VLLM_NOTE = ("vLLM 0.33.0 cannot load a placement (its EPLB always starts from the trivial layout and "
             "re-plans itself): this file is for reading, not for vLLM to serve")


def sglang_server_flags(placement: Placement, path: str | Path) -> list[str]:
    """The SGLang 0.5.23 server flags the exported file needs; SGLang checks none of them against the
    file (python/sglang/srt/eplb/expert_location.py), so a mismatch serves a wrong layout silently.
    Slots = experts + --ep-num-redundant-experts, split over --ep-size ranks on --nnodes nodes; static
    dispatch (what `solve --engine sglang` plans for) needs an all-to-all backend (DeepEP)."""
    topo = placement.topology
    return [
        "--init-expert-location", str(path),
        "--ep-num-redundant-experts", str(topo.num_slots - placement.num_experts),
        "--tp-size", str(topo.num_gpus), "--ep-size", str(topo.num_gpus),
        "--nnodes", str(topo.num_nodes),
        "--moe-a2a-backend", "deepep",
        "--ep-dispatch-algorithm", "static",
    ]


def export_placement(placement: Placement, fmt: str, path: str | Path, *, num_model_layers: int | None = None) -> None:
    """Write `placement` in engine format `fmt` (one of FORMATS) to `path`, atomically.

    num_model_layers: rows of the SGLang map (overrides `placement.num_model_layers`); other formats
    only record it. Raises ValueError for an unknown format, a missing layer count or an unwritable
    path; nothing is written then.
    """
    data = export_bytes(placement, fmt, num_model_layers=num_model_layers)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write ({exc.strerror or exc})") from None


def export_bytes(placement: Placement, fmt: str, *, num_model_layers: int | None = None) -> bytes:
    """The file contents `export_placement` writes, without touching the disk."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    M = _model_layers(placement, num_model_layers, required=fmt == "sglang")
    if fmt == "sglang":
        return _sglang_json(placement, M).encode("utf-8")
    if fmt == "trtllm":
        return _trtllm_yaml(placement, M).encode("utf-8")
    if fmt == "vllm":
        redundant = placement.topology.num_slots - placement.num_experts
        tensors = {
            "physical_to_logical_map": placement.phy2log_LP,
            "logical_to_physical_map": _pad_replicas(placement.log2phy_LER, redundant + 1),
            "logical_replica_count": placement.replica_count_LE,
        }
    else:
        tensors = {
            "phy2log": placement.phy2log_LP,
            "log2phy": placement.log2phy_LER,
            "logcnt": placement.replica_count_LE,
        }
    return _safetensors(tensors, _metadata(placement, fmt, M))


def export_notes(placement: Placement, fmt: str, path: str | Path) -> list[str]:
    """What the user must know to use the written file: SGLang's matching flags and its EPLB, the EP size
    TensorRT-LLM must serve with, that vLLM cannot load a placement."""
    if fmt == "sglang":
        return [f"start SGLang with: {' '.join(sglang_server_flags(placement, path))}",
                f"(SGLang checks none of these against the file), and {SGLANG_EPLB_WARNING}"]
    if fmt == "trtllm":
        topo = placement.topology
        return [f"serve with moe_expert_parallel_size {topo.num_gpus} ({topo.num_nodes} nodes x {topo.gpus_per_node}): "
                "TensorRT-LLM accepts another EP size silently and regroups the slots"]
    if fmt == "vllm":
        return [VLLM_NOTE]
    return []


def restart_instructions(placement: Placement, path: str | Path, engine: str) -> list[str]:
    """`apply --engine sglang` (or another engine without a live reshard): what to do instead."""
    engine = getattr(engine, "value", engine)
    if engine != "sglang":
        return [f"{engine} cannot take a placement while it runs, and moeplace cannot apply one to it: "
                f"export it (moeplace export {path} --format {engine} -o FILE) and restart the engine with it"
                + (" (vLLM 0.33.0 cannot load one at all)" if engine == "vllm" else "")]
    exported = Path(path).with_suffix(".sglang.json")
    flags = " ".join(sglang_server_flags(placement, exported))
    return [
        "SGLang 0.5.23 has no endpoint that takes a new placement on a running server: nothing was applied. "
        "Restart SGLang with the placement:",
        f"  moeplace export {path} --format sglang -o {exported}",
        f"  python -m sglang.launch_server <your model and serving flags> {flags}",
        f"and {SGLANG_EPLB_WARNING}.",
    ]


def _model_layers(placement: Placement, override: int | None, *, required: bool) -> int | None:
    """The model's layer count: the argument, else the placement's, else L when layers are 0..L-1."""
    layers = placement.layers
    M = override if override is not None else placement.num_model_layers
    if M is None and layers[0] == 0 and layers[-1] == len(layers) - 1:
        M = len(layers)
    if M is None:
        if required:
            raise ValueError(
                f"{placement.source}: placement covers model layers {int(layers[0])}..{int(layers[-1])} but does not "
                "say how many layers the model has; give num_model_layers (e.g. 61 for DeepSeek-V3)"
            )
        return None
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M <= layers[-1]:
        raise ValueError(
            f"num_model_layers must be an integer above the last placed layer {int(layers[-1])}, got {M!r}"
        )
    return int(M)


def _sglang_json(placement: Placement, M: int) -> str:
    """`{"physical_to_logical_map": [M, P]}`, one row per line; unplaced layers trivial (p % E)."""
    P, E = placement.topology.num_slots, placement.num_experts
    map_MP = np.tile(np.arange(P) % E, (M, 1))
    map_MP[placement.layers] = placement.phy2log_LP
    rows = ",\n".join("  " + json.dumps(row) for row in map_MP.tolist())
    return '{"physical_to_logical_map": [\n' + rows + "\n]}\n"


def _trtllm_yaml(placement: Placement, M: int | None) -> str:
    """`num_slots`, `initial_global_assignments` {model layer id: [P]}, `layer_updates_per_iter: 0`."""
    topo = placement.topology
    head = [
        f"# moeplace {__version__} placement for TensorRT-LLM moe_config.load_balancer",
        f"# planned for EP size {topo.num_gpus} ({topo.num_nodes} nodes x {topo.gpus_per_node} GPUs): serve with "
        f"moe_expert_parallel_size {topo.num_gpus}; TensorRT-LLM accepts another EP size silently and regroups "
        "the slots",
        f"# {placement.num_experts} experts, {topo.num_gpus} GPUs x {topo.slots_per_gpu} slots, "
        f"model layers {int(placement.layers[0])}..{int(placement.layers[-1])}"
        + (f" of {M}" if M is not None else ""),
        f"num_slots: {topo.num_slots}",
        "layer_updates_per_iter: 0",
        "initial_global_assignments:",
    ]
    rows = zip(placement.layers.tolist(), placement.phy2log_LP.tolist())
    body = [f"  {layer}: {json.dumps(row)}" for layer, row in rows]
    return "\n".join(head + body) + "\n"


def _pad_replicas(log2phy_LER: np.ndarray, width: int) -> np.ndarray:
    """[L, E, R] -> [L, E, width], padded with -1 (width >= R always: every expert has a slot)."""
    L, E, R = log2phy_LER.shape
    assert width >= R, (width, R)
    out = np.full((L, E, width), -1, dtype=np.int64)
    out[:, :, :R] = log2phy_LER
    return out


def _metadata(placement: Placement, fmt: str, M: int | None) -> dict[str, str]:
    topo = placement.topology
    meta = {
        "format": f"moeplace.export.{fmt}",
        "moeplace_version": __version__,
        "layers": json.dumps(placement.layers.tolist()),
        "num_experts": str(placement.num_experts),
        "topology": json.dumps(topo.to_dict(), sort_keys=True),
        "provenance": json.dumps(placement.provenance, sort_keys=True, default=str),
    }
    if M is not None:
        meta["num_model_layers"] = str(M)
    return meta


def _safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    return safetensors_save({k: np.ascontiguousarray(v, dtype=np.int64) for k, v in tensors.items()}, metadata=metadata)
