"""The deployment a solve plans for: topology flags, else the one a trace was recorded on.

A trace recorded on `moeplace serve` carries the live placement in its metadata (`placement`, the
placement JSON) and the served model's expert size (`expert_bytes`); `solve --like URL` asks a
running server for its placement instead, and `solve --from OLD` plans for OLD's deployment.
Explicit flags always win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeplace.placement import Placement, placement_from_dict
from moeplace.topology import DEEPSEEK_V3_EXPERT_BYTES, Topology
from moeplace.trace import Trace


@dataclass(frozen=True, kw_only=True)
class TopologyFlags:
    """What the command line gave (None: not given)."""

    gpus: int | None = None
    gpus_per_node: int | None = None
    slots_per_gpu: int | None = None
    redundant: int | None = None
    expert_bytes: int | None = None
    gpu_memory_budget: int | None = None


def served_placement(trace: Trace) -> Placement | None:
    """The placement a trace recorded on moeplace's server was served with (None for other traces)."""
    text = trace.metadata.get("placement")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{trace.source}: metadata 'placement' is not JSON ({exc})") from None
    return placement_from_dict(data, f"{trace.source} (metadata 'placement')")


def expert_bytes_of(trace: Trace) -> int | None:
    """The traced model's bytes per expert: the server's record, else DeepSeek-V3's for its shape."""
    if "expert_bytes" in trace.metadata:
        value = trace.metadata["expert_bytes"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{trace.source}: metadata 'expert_bytes' must be a positive integer, got {value!r}")
        return int(value)
    if trace.num_experts == 256 and trace.num_model_layers == 61:
        return DEEPSEEK_V3_EXPERT_BYTES
    return None


def resolve_topology(flags: TopologyFlags, trace: Trace, like: Placement | None = None) -> Topology:
    """The topology to plan for: each flag given wins; the rest come from `like` (a server's live
    placement), else from the placement the trace was recorded on. ValueError naming what is missing."""
    served = like or served_placement(trace)
    base = None if served is None else served.topology
    gpus = flags.gpus or (base and base.num_gpus)
    per_node = flags.gpus_per_node or (base and base.gpus_per_node)
    slots, redundant = flags.slots_per_gpu, flags.redundant
    if slots is None and redundant is None and base is not None:
        slots = base.slots_per_gpu if gpus == base.num_gpus else None
    missing = [name for name, value in (("--gpus", gpus), ("--gpus-per-node", per_node)) if not value]
    if slots is None and redundant is None:
        missing.append("--slots-per-gpu or --redundant")
    if missing and base is None:
        raise ValueError(f"give {', '.join(missing)}: {trace.source} was not recorded on moeplace's server "
                         "(no live placement in its metadata) and no --like URL was given")
    if missing:
        raise ValueError(f"give {', '.join(missing)}: --gpus {gpus} differs from the {base.num_gpus} GPUs "
                         f"{served.source} serves, so its {base.slots_per_gpu} slots per GPU do not apply")
    size = flags.expert_bytes or expert_bytes_of(trace) or (base and base.expert_bytes) or DEEPSEEK_V3_EXPERT_BYTES
    return Topology.build(gpus, per_node, trace.num_experts, slots, redundant, expert_bytes=size,
                          gpu_memory_budget=flags.gpu_memory_budget)
