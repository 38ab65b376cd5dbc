"""TensorRT-LLM expert statistic folders, read into a `Trace`.

TensorRT-LLM, NVIDIA/TensorRT-LLM `tensorrt_llm/_torch/expert_statistic.py` (commit 0fccc5b9): on
when EXPERT_STATISTIC_ITER_RANGE=start-stop is set, written to EXPERT_STATISTIC_PATH (no `TLLM_`
prefix in the sources found). Rank 0 writes `meta_info.json` = {num_experts, num_experts_per_token};
every rank writes `rank{R}.safetensors`, one int64 [E] bincount of its selected experts per key
"{iteration}_{layer}", layer being the model's absolute id (3..60 for DeepSeek-V3, as
`examples/wide_ep/ep_load_balancer/README.md` shows). `examples/wide_ep/ep_load_balancer/utils.py`
(commit 7ce477f3) sums the rank files and skips `rank*_raw.safetensors`; so do we (the raw per-token
files are not read). With the MoE load balancer on, the MoE modules (`fused_moe_*.py`, e.g.
`ExpertStatistic.maybe_add_info(self.num_slots, token_selected_slots)`) count SLOT ids after the
balancer's routing, and meta_info's num_experts is then the slot count (288 for DeepSeek-R1 with 32
redundant): read as experts that plans nonsense. Such folders are folded slot -> expert with the
balancer's YAML (`num_slots`, `initial_global_assignments` {layer: [expert of each slot]},
`layer_updates_per_iter`, as `moeplace export --format trtllm` writes it); without the YAML they are
refused where the shape shows them (DeepSeek's layers 3..60 of top-8 with num_experts other than 256),
and always when the YAML says the balancer moved experts during the run (layer_updates_per_iter > 0).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_positive_int, check_range
from moeplace.rawfields import _numeric, _read_json, _read_safetensors
from moeplace.readers import _TRTLLM_RANK_FILE, _build_trace
from moeplace.trace import Trace

_TRTLLM_KEY = re.compile(r"(\d+)_(\d+)")


def read_trtllm_statistic(folder: str | Path, *, num_model_layers: int | None = None,
                          trtllm_config: str | Path | None = None) -> Trace:
    """Read a TensorRT-LLM expert statistic folder: one window per iteration, counts summed over ranks;
    slot-id statistics (load balancer on) folded to experts with `trtllm_config` (module doc)."""
    folder = Path(folder)
    meta_path = folder / "meta_info.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder}: not a TensorRT-LLM expert statistic folder (no meta_info.json)")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    E = check_positive_int(str(meta_path), "num_experts", meta.get("num_experts"))
    K = check_positive_int(str(meta_path), "num_experts_per_token", meta.get("num_experts_per_token"))
    files = sorted((p for p in folder.iterdir() if _TRTLLM_RANK_FILE.fullmatch(p.name)),
                   key=lambda p: int(_TRTLLM_RANK_FILE.fullmatch(p.name).group(1)))
    if not files:
        raise ValueError(f"{folder}: no rank{{R}}.safetensors files next to meta_info.json")
    totals: dict[tuple[int, int], np.ndarray] = {}
    for file in files:
        for key, value in _read_safetensors(file).items():
            match = _TRTLLM_KEY.fullmatch(key)
            if match is None:
                raise ValueError(f"{file}: tensor {key!r} is not named '<iteration>_<layer>'")
            counts = check_counts(str(file), key, check_array(str(file), key, value, ndim=1, kind="f", shape=(E,)))
            it_layer = (int(match.group(1)), int(match.group(2)))
            totals[it_layer] = totals.get(it_layer, 0) + counts
    iters = sorted({i for i, _ in totals})
    layers = sorted({layer for _, layer in totals})
    for i in iters:
        for layer in layers:
            if (i, layer) not in totals:
                raise ValueError(f"{folder}: no rank file holds tensor '{i}_{layer}' (iteration {i}, layer {layer})")
    counts_WLE = np.array([[totals[(i, layer)] for layer in layers] for i in iters])
    info = {"engine": "tensorrt-llm", "format": "tensorrt-llm expert statistic", "ranks": str(len(files))}
    if trtllm_config is not None:
        counts_WLE = _fold_trtllm_slots(counts_WLE, layers, Path(trtllm_config), meta_path, info)
    elif K == 8 and layers[0] == 3 and E != 256:
        raise ValueError(
            f"{meta_path}: num_experts is {E} for DeepSeek's layers 3..{layers[-1]} of top-8, whose models have 256 "
            "experts: the statistic counts load-balancer slots; give the load balancer's YAML (--trtllm-config) "
            "to fold slots to experts")
    return _build_trace(folder, counts_WLE, info, window_names=[f"iteration {i}" for i in iters],
                        layer_ids=layers, num_model_layers=num_model_layers, top_k=K)


def _fold_trtllm_slots(counts_WLP: np.ndarray, layers: list[int], config: Path, meta_path: Path,
                       info: dict[str, str]) -> np.ndarray:
    """[W, L, P] slot counts -> [W, L, E] expert counts through the YAML's initial_global_assignments;
    counts already per expert (balancer off: num_experts = the experts) are returned unchanged."""
    slots, assignments = _read_balancer_yaml(config)
    P = counts_WLP.shape[2]
    experts = 1 + max(max(row) for row in assignments.values())
    if P == experts and P != slots:
        info["notes"] = f"{config.name}: statistic counts experts (balancer off); nothing folded"
        return counts_WLP
    if P != slots:
        raise ValueError(f"{meta_path}: num_experts is {P}, neither the {slots} slots of {config} nor its "
                         f"{experts} experts: the statistic and the YAML are not of one deployment")
    missing = [layer for layer in layers if layer not in assignments]
    if missing:
        raise ValueError(f"{config}: initial_global_assignments has no layer {missing[0]} of the statistic")
    out = np.zeros(counts_WLP.shape[:2] + (experts,))
    for l, layer in enumerate(layers):
        np.add.at(out[:, l], (slice(None), np.asarray(assignments[layer])), counts_WLP[:, l])
    info["folded"] = f"{P} load-balancer slots folded to {experts} experts with {config.name}"
    return out


def _read_balancer_yaml(config: Path) -> tuple[int, dict[int, list[int]]]:
    """TensorRT-LLM's MoeLoadBalancerConfig YAML: num_slots and initial_global_assignments, checked."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{config}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{config}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("moe_config"), dict):  # a whole extra-options file
        data = data["moe_config"].get("load_balancer", data)
    if not isinstance(data, dict) or "num_slots" not in data or "initial_global_assignments" not in data:
        raise ValueError(f"{config}: expected TensorRT-LLM load-balancer keys 'num_slots' and "
                         "'initial_global_assignments'")
    slots = check_positive_int(str(config), "num_slots", data["num_slots"])
    updates = data.get("layer_updates_per_iter", 0)
    if updates:
        raise ValueError(f"{config}: layer_updates_per_iter is {updates}: the balancer moved experts while "
                         "recording, so slot counts cannot be folded with the initial assignments")
    assignments = data["initial_global_assignments"]
    if not isinstance(assignments, dict) or not assignments:
        raise ValueError(f"{config}: 'initial_global_assignments' must map layer ids to slot lists")
    out = {}
    for layer, row in assignments.items():
        field = f"initial_global_assignments[{layer}]"
        ids = check_array(str(config), field, _numeric(str(config), field, row), ndim=1, kind="i", shape=(slots,))
        check_range(str(config), field, ids, 0, slots)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{config}: layer key {layer!r} of 'initial_global_assignments' is not an integer")
        out[layer] = ids.tolist()
    return slots, out
