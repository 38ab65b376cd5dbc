"""Cheap checks of what a client sends, made before anything is built from it or sent to other ranks.

- `check_json_tree`: a free-form JSON value (a placement's provenance) of bounded depth and size, of
  JSON types only, with finite numbers: it is pickled into the reshard action every rank receives,
  and Python's pickle recurses once per nesting level.
- `check_fits_served`: a placement body against the served placement, on the raw JSON, before any
  array is made: same experts, layers and topology shape, and rows of the served length. A live
  reshard can only move experts between the slots that exist, so nothing else can be accepted, and a
  body claiming a huge topology never reaches numpy.
"""

from __future__ import annotations

import math

from moeplace.placement import Placement

MAX_DEPTH = 16
MAX_NODES = 10_000


def check_json_tree(value: object, where: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """ValueError unless `value` is JSON data (dict with str keys, list, str, finite number, bool, None)
    nested at most `max_depth` deep with at most `max_nodes` values in all. Iterative: no recursion."""
    stack, nodes = [(value, 1, where)], 0
    while stack:
        node, depth, path = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ValueError(f"{where}: more than {max_nodes} values")
        if depth > max_depth:
            raise ValueError(f"{path}: nested more than {max_depth} levels deep")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise ValueError(f"{path}: key {key!r} is not a string")
                stack.append((child, depth + 1, f"{path}.{key}"[:200]))
        elif isinstance(node, list):
            stack.extend((child, depth + 1, f"{path}[{i}]"[:200]) for i, child in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"{path}: {node} is not a finite number")
        elif not (node is None or isinstance(node, (str, int, float, bool))):
            raise ValueError(f"{path}: {type(node).__name__} is not a JSON value")


def check_fits_served(data: object, served: Placement, src: str) -> None:
    """ValueError unless the placement JSON `data` has the served placement's experts, layers and
    topology shape, with phy2log (and split) of exactly [layers, slots]. Reads only the JSON values."""
    if not isinstance(data, dict):
        raise ValueError(f"{src}: a placement must be a JSON object")
    topology = data.get("topology")
    if not isinstance(topology, dict):
        raise ValueError(f"{src}: field 'topology' must be an object")
    want = served.topology
    for field, served_value in (("num_gpus", want.num_gpus), ("gpus_per_node", want.gpus_per_node),
                                ("slots_per_gpu", want.slots_per_gpu)):
        if not _equal_int(topology.get(field), served_value):
            raise ValueError(f"{src}: topology.{field} is {_show(topology.get(field))}, the server runs {served_value}")
    if not _equal_int(data.get("num_experts"), served.num_experts):
        raise ValueError(f"{src}: num_experts is {_show(data.get('num_experts'))}, the model has {served.num_experts}")
    layers = served.layers.tolist()
    if not isinstance(data.get("layers"), list) or len(data["layers"]) != len(layers) or \
            not all(_equal_int(a, b) for a, b in zip(data["layers"], layers)):
        raise ValueError(f"{src}: layers {_show(data.get('layers'))} are not the MoE layers {layers} of the served model")
    for field in ("phy2log", "split"):
        rows = data.get(field)
        if field == "split" and rows is None:
            continue
        if not isinstance(rows, list) or len(rows) != len(layers) or \
                not all(isinstance(r, list) and len(r) == want.num_slots for r in rows):
            raise ValueError(f"{src}: field '{field}' must be {len(layers)} rows of {want.num_slots} slots")
    if "provenance" in data:
        check_json_tree(data["provenance"], f"{src}: provenance")


def _equal_int(value: object, expected: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def _show(value: object) -> str:
    return repr(value)[:60]
