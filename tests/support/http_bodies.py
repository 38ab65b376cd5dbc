"""Hypothesis strategies for the HTTP fuzz test (tests/runtime/test_fuzz_http.py): junk JSON, completion
bodies, and placements made invalid in one way, each encoded as the bytes of a request body."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from moeplace.placement import placement_to_json, trivial_placement
from moeplace.topology import Topology


TEXT = st.text(alphabet="ab_01.-/ \n\x00é\u2603", max_size=6)
HUGE = [10**9, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1, 1e308, 5e-324]
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's json nests
NEST = '{"a": ' * 500 + "1" + "}" * 500  # parses, but 500 levels deep: pickle recursed to death on it


def json_value() -> st.SearchStrategy:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from(HUGE),
                     st.floats(allow_nan=True, allow_infinity=True), TEXT, st.sampled_from(["@DEEP@", "@NEST@"]))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=10)


def encode(body: object) -> bytes:
    return json.dumps(body).replace('"@DEEP@"', DEEP).replace('"@NEST@"', NEST).encode()


COMPLETION_FIELDS = {
    "prompt": st.one_of(st.text(max_size=12), json_value(), st.sampled_from(["", "\ud800", "x" * 5000, "\x00"])),
    "temperature": st.one_of(st.sampled_from([0.0, 0.7, 5e-324, 1e-310, 1e308, math.inf, -math.inf, math.nan,
                                              -1.0, "0.5"]), json_value()),
    "seed": st.one_of(st.integers(-(2**70), 2**70), json_value()),
    "model": json_value(),
}


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b"[]", b'"prompt"', b"123", b'{"prompt": "a", "max_tokens": 1',
                     b'{"prompt": "\\ud800", "max_tokens": 1}', b'\xff\xfe{"prompt": "a"}', DEEP.encode(),
                     b'{"prompt": "a", "max_tokens": NaN}', b'{"prompt": "a", "max_tokens": 1e999}']),
)


@st.composite
def completion_bodies(draw) -> tuple[bytes, str]:
    if draw(st.integers(0, 4)) == 0:
        return draw(RAW_BODIES), draw(st.sampled_from(["application/json", "text/plain"]))
    body = draw(st.fixed_dictionaries(
        # max_tokens always present and mostly tiny: a valid body is answered in a step or two
        {"max_tokens": st.one_of(st.integers(1, 2), st.sampled_from([0, -1, 257, 10**30, 1.5, 2.0, "2", True, None]))},
        optional=COMPLETION_FIELDS))
    body.update(draw(st.dictionaries(TEXT, json_value(), max_size=2)))  # unknown fields are ignored
    return encode(body), "application/json"


@st.composite
def junk_unlike(draw, original: object) -> object:
    value = draw(json_value())
    assume(not value == original)  # 2.0 == 2 reads back as the same placement; NaN is never equal
    return value


@st.composite
def bad_placements(draw, base: dict) -> bytes:
    """The live placement made invalid in one way, or a valid placement of another deployment or model."""
    doc = copy.deepcopy(base)
    phy2log = doc["phy2log"]
    op = draw(st.sampled_from(["replace", "delete", "entry", "shape", "split", "topology", "provenance",
                               "num_model_layers", "other deployment", "raw", "deep", "non-finite", "amplify"]))
    if op == "replace":
        field = draw(st.sampled_from(["format", "format_version", "num_experts", "layers", "topology", "phy2log"]))
        doc[field] = draw(junk_unlike(doc[field]))
    elif op == "delete":
        del doc[draw(st.sampled_from(["format", "format_version", "num_experts", "layers", "topology", "phy2log"]))]
    elif op == "entry":  # every expert has one slot: any other value leaves an expert without a replica
        row, slot = draw(st.integers(0, len(phy2log) - 1)), draw(st.integers(0, len(phy2log[0]) - 1))
        phy2log[row][slot] = draw(junk_unlike(phy2log[row][slot]))
    elif op == "shape":
        change = draw(st.sampled_from(["drop row", "drop slot", "add slot", "transpose", "flatten", "wrap", "empty"]))
        doc["phy2log"] = {
            "drop row": lambda: phy2log[1:], "drop slot": lambda: [r[1:] for r in phy2log],
            "add slot": lambda: [r + [0] for r in phy2log], "transpose": lambda: np.array(phy2log).T.tolist(),
            "flatten": lambda: sum(phy2log, []), "wrap": lambda: [phy2log], "empty": lambda: [],
        }[change]()
    elif op == "split":  # one replica per expert: only an all-1.0 split is valid
        v = draw(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not abs(x - 1.0) <= 1e-6))
        doc["split"] = draw(st.sampled_from([[[v] * len(phy2log[0])] * len(phy2log), [[1.0] * 3], [v]])) \
            if draw(st.booleans()) else draw(json_value().filter(lambda x: x is not None))
    elif op == "topology":
        field = draw(st.sampled_from(["num_gpus", "gpus_per_node", "slots_per_gpu", "expert_bytes", "nvlink_gbps",
                                      "gpu_memory_budget", "unknown"]))
        bad = {"num_gpus": [0, 1, 4, 10**9, -2], "gpus_per_node": [0, 2, 3, 10**9], "slots_per_gpu": [0, 1, 31, 10**9],
               "expert_bytes": [0, -1], "nvlink_gbps": [0, -1.0, math.nan], "gpu_memory_budget": [0, 1, -5],
               "unknown": [1]}[field]
        doc["topology"][field] = draw(st.sampled_from(bad) | junk_unlike(None).filter(
            lambda v: not isinstance(v, (int, float))))  # true > 0: Topology takes it as 1 GB/s
    elif op == "provenance":
        doc["provenance"] = draw(json_value().filter(lambda v: v and not isinstance(v, dict)))
    elif op == "deep":  # valid but for a nesting no rank may be sent
        doc["provenance"] = {"note": "@NEST@"}
    elif op == "non-finite":  # json.dumps writes NaN / Infinity literals, which strict JSON has not
        where = draw(st.sampled_from(["provenance", "nvlink_gbps", "gpu_memory_budget", "split"]))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if where == "provenance":
            doc["provenance"] = {"x": value}
        elif where == "split":
            doc["split"] = [[value] * len(phy2log[0])] * len(phy2log)
        else:
            doc["topology"][where] = value
    elif op == "amplify":  # one GPU, expert 0 copied into most slots: small body, huge replica table
        slots = draw(st.integers(1_000, 60_000))
        experts = draw(st.integers(1, slots))
        doc.update(num_experts=experts, phy2log=[list(range(experts)) + [0] * (slots - experts)] * len(phy2log),
                   topology={"num_gpus": 1, "gpus_per_node": 1, "slots_per_gpu": slots})
    elif op == "num_model_layers":
        doc["num_model_layers"] = draw(st.sampled_from([0, 1, 3, 5, 10**4, 10**9, -1, 3.5, "4", True, [4]]))
    elif op == "other deployment":
        E = doc["num_experts"]
        other = {"4 GPUs": lambda: trivial_placement(E, Topology(4, 1, 16), np.array(doc["layers"]), 4),
                 "other layers": lambda: trivial_placement(E, Topology(2, 1, 32), np.array([0, 1, 2]), 4),
                 "32 experts": lambda: trivial_placement(32, Topology(2, 1, 32), np.array(doc["layers"]), 4)}
        return placement_to_json(other[draw(st.sampled_from(sorted(other)))]()).encode()
    else:
        return draw(RAW_BODIES)
    return encode(doc)
