"""`Placement`: which logical expert each physical slot holds, per MoE layer, and its JSON file.

phy2log_LP [L, P]: the logical expert in slot p of layer l. Derived: replica_count_LE [L, E] and
log2phy_LER [L, E, R] (slots of each expert's replicas, -1 padded). split_LP: optional share of
its expert's tokens each replica takes (sums to 1 over an expert's replicas; None = equal split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeplace.checks import check_array, check_counts, check_layers, check_positive_int, check_range
from moeplace.fileio import atomic_write_text
from moeplace.topology import Topology

PLACEMENT_FORMAT = "moeplace.placement"
PLACEMENT_FORMAT_VERSION = 1
# log2phy_LER holds L x E x (most replicas of one expert) slot ids: a placement that copies one expert
# into most of many slots would make it huge from a small file, so it is refused past this many entries.
MAX_LOG2PHY_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Placement:
    phy2log_LP: np.ndarray
    num_experts: int
    topology: Topology
    layers: np.ndarray
    num_model_layers: int | None = None
    split_LP: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    source: str = "placement"
    replica_count_LE: np.ndarray = field(init=False, repr=False)
    log2phy_LER: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        src, topo = self.source, self.topology
        E = check_positive_int(src, "num_experts", self.num_experts)
        if E > topo.num_slots:  # checked before counting replicas, which allocates [L, E]
            raise ValueError(f"{src}: {E} experts do not fit in {topo.num_slots} slots (every expert needs one)")
        phy2log = check_array(src, "phy2log", self.phy2log_LP, ndim=2, kind="i", shape=(None, topo.num_slots))
        L = phy2log.shape[0]
        if L == 0:
            raise ValueError(f"{src}: field 'phy2log' has no layers")
        check_range(src, "phy2log", phy2log, 0, E)
        phy2log = phy2log.astype(np.int64)
        object.__setattr__(self, "phy2log_LP", phy2log)
        layers = check_layers(src, self.layers, L, self.num_model_layers)
        object.__setattr__(self, "layers", layers)
        counts = np.stack([np.bincount(row, minlength=E) for row in phy2log])
        missing = np.argwhere(counts == 0)
        if len(missing):
            l, e = (int(i) for i in missing[0])
            raise ValueError(
                f"{src}: layer {int(layers[l])} has no replica of expert {e} ({len(missing)} expert(s) missing in all)"
            )
        R = int(counts.max())
        if L * E * R > MAX_LOG2PHY_ENTRIES:
            raise ValueError(f"{src}: {L} layers x {E} experts x {R} replicas of the most copied expert is over "
                             f"{MAX_LOG2PHY_ENTRIES} replica entries: not a placement any engine could use")
        object.__setattr__(self, "replica_count_LE", counts)
        object.__setattr__(self, "log2phy_LER", _log2phy(phy2log, counts))
        if self.split_LP is not None:
            split = check_counts(src, "split", check_array(src, "split", self.split_LP, ndim=2, kind="f", shape=phy2log.shape))
            sums = np.zeros((L, E))
            np.add.at(sums, (np.arange(L)[:, None], phy2log), split)
            if not np.allclose(sums, 1.0, atol=1e-6):
                l, e = np.argwhere(~np.isclose(sums, 1.0, atol=1e-6))[0]
                raise ValueError(f"{src}: split of expert {e} in layer {int(layers[l])} sums to {sums[l, e]:.6f}, not 1")
            object.__setattr__(self, "split_LP", split)

    @property
    def num_layers(self) -> int:
        return self.phy2log_LP.shape[0]

    def gpu_of_slot(self) -> np.ndarray:
        """[P] GPU of each slot."""
        return np.arange(self.topology.num_slots) // self.topology.slots_per_gpu

    def duplicate_replicas(self) -> int:
        """Replicas that share a GPU with another replica of the same expert (wasted slots)."""
        G, S = self.topology.num_gpus, self.topology.slots_per_gpu
        per_gpu = self.phy2log_LP.reshape(self.num_layers, G, S)
        return int(sum(S - len(np.unique(row)) for layer in per_gpu for row in layer))

    def with_provenance(self, **extra) -> Placement:
        return Placement(
            phy2log_LP=self.phy2log_LP,
            num_experts=self.num_experts,
            topology=self.topology,
            layers=self.layers,
            num_model_layers=self.num_model_layers,
            split_LP=self.split_LP,
            provenance={**self.provenance, **extra},
            source=self.source,
        )


def _log2phy(phy2log_LP: np.ndarray, counts_LE: np.ndarray) -> np.ndarray:
    L, _ = phy2log_LP.shape
    R = int(counts_LE.max())
    out = np.full((L, counts_LE.shape[1], R), -1, dtype=np.int64)
    for l in range(L):
        order = np.argsort(phy2log_LP[l], kind="stable")
        experts = phy2log_LP[l, order]
        rank = np.arange(len(order)) - np.searchsorted(experts, experts, side="left")
        out[l, experts, rank] = order
    return out


def trivial_placement(num_experts: int, topology: Topology, layers: np.ndarray, num_model_layers: int | None = None) -> Placement:
    """Slot p holds expert p % E: the layout an engine starts with when given no placement."""
    phy2log = np.tile(np.arange(topology.num_slots) % num_experts, (len(layers), 1))
    return Placement(phy2log, num_experts, topology, np.asarray(layers), num_model_layers, provenance={"solver": "trivial"})


def placement_to_json(placement: Placement) -> str:
    """Human-diffable JSON: one line per layer row."""
    head = {
        "format": PLACEMENT_FORMAT,
        "format_version": PLACEMENT_FORMAT_VERSION,
        "num_experts": placement.num_experts,
        "num_model_layers": placement.num_model_layers,
        "layers": placement.layers.tolist(),
        "topology": placement.topology.to_dict(),
        "provenance": placement.provenance,
    }
    lines = [json.dumps(head, indent=1)[:-2] + ","]

    def rows(name: str, array: np.ndarray, fmt) -> None:
        body = ",\n".join("  [" + ", ".join(fmt(v) for v in row) + "]" for row in array)
        lines.append(f' "{name}": [\n{body}\n ]')

    rows("phy2log", placement.phy2log_LP, str)
    if placement.split_LP is not None:
        lines[-1] += ","
        # Shortest repr that reads back to the same float: the file round-trips exactly.
        rows("split", placement.split_LP, lambda v: repr(float(v)))
    return "\n".join(lines) + "\n}\n"


def save_placement(placement: Placement, path: str | Path) -> None:
    atomic_write_text(path, placement_to_json(placement))


def load_placement(path: str | Path) -> Placement:
    src = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src}: cannot read ({exc})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{src}: not valid JSON ({exc})") from None
    return placement_from_dict(data, src)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # NaN / Infinity: the file would not read back elsewhere


def placement_from_dict(data: object, src: str = "placement") -> Placement:
    """Validate a parsed placement JSON object (a file, or an HTTP request body)."""
    if not isinstance(data, dict):
        raise ValueError(f"{src}: a placement must be a JSON object")
    if data.get("format") != PLACEMENT_FORMAT:
        raise ValueError(f"{src}: field 'format' is {data.get('format')!r}, expected {PLACEMENT_FORMAT!r}")
    if data.get("format_version") != PLACEMENT_FORMAT_VERSION:
        raise ValueError(f"{src}: format_version {data.get('format_version')!r} is not supported (reads 1)")
    for name in ("num_experts", "layers", "topology", "phy2log"):
        if name not in data:
            raise ValueError(f"{src}: field '{name}' is missing")
    provenance = data.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise ValueError(f"{src}: field 'provenance' must be an object")
    return Placement(
        phy2log_LP=_as_array(data["phy2log"], src, "phy2log"),
        num_experts=data["num_experts"],
        topology=Topology.from_dict(data["topology"], src),
        layers=_as_array(data["layers"], src, "layers"),
        num_model_layers=data.get("num_model_layers"),
        split_LP=None if data.get("split") is None else _as_array(data["split"], src, "split"),
        provenance=provenance,
        source=src,
    )


def _as_array(value: object, src: str, name: str) -> np.ndarray:
    try:
        array = np.array(value)
    except ValueError:
        raise ValueError(f"{src}: field '{name}' is ragged (rows of different lengths)") from None
    # numpy turns [0, true, 2] into integers: look at the JSON values themselves for booleans.
    if array.dtype == object or array.dtype.kind not in "iuf" or any(
        isinstance(v, bool) for v in np.array(value, dtype=object).ravel()
    ):
        raise ValueError(f"{src}: field '{name}' must hold only numbers")
    if name != "split" and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{src}: field '{name}' must hold integers")
        array = array.astype(np.int64)
    return array
