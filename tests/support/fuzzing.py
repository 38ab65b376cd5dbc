"""Shared pieces of the fuzz tests: hypothesis settings, the junk strategies, and the two checks every
fuzzed input must pass (library: a value or a ValueError, fast; CLI: exit 0, or 1 with one line)."""

from __future__ import annotations

import copy
import json
import struct
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplace.cli import app

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLI_FUZZ = settings(FUZZ, max_examples=40)
runner = CliRunner(env={"COLUMNS": "200"})
TRIED: Counter = Counter()  # inputs tried per reader / command, printed at the end (README figures)
SECONDS_PER_INPUT = 2.0  # a bad file fails fast: no reader may take longer on these small inputs
# Text in fuzzed names and values: newlines and NULs (one-line messages) and markup-like brackets.
TEXT = st.text(alphabet="ab_01.-/ \n\x00é[]", max_size=6)
HUGE_INTS = [10**9, 2**31, 2**63 - 1, 2**63, 10**30, -(2**63) - 1]
DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's json nests


def library(kind: str, load) -> object | None:
    """`load()`'s result, or None when it raised ValueError; any other exception fails the test."""
    TRIED[kind] += 1
    start = time.perf_counter()
    try:
        return load()
    except ValueError as exc:
        assert str(exc), "a ValueError without a message"
        return None
    finally:
        assert time.perf_counter() - start < SECONDS_PER_INPUT


def cli(kind: str, args: list, folder: Path, outputs: tuple[Path, ...] = ()) -> int:
    """Run the CLI; exit 0, or exit 1 with one 'error:' line, no traceback, no output or temporary file."""
    TRIED[kind] += 1
    before = set(folder.iterdir())
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        assert all(out.exists() for out in outputs)
        return 0
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert set(folder.iterdir()) == before - set(outputs), "a failed command left a file behind"
    return 1


def json_value() -> st.SearchStrategy:
    """Junk for any JSON field: wrong types, NaN/inf, negative and enormous numbers, nested junk."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.sampled_from(HUGE_INTS),
                     st.floats(allow_nan=True, allow_infinity=True), TEXT, st.just("@DEEP@"))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=10)


@st.composite
def mutated_json(draw, base: object) -> str:
    """`base` with one node replaced by junk, deleted, wrapped in a list or duplicated; as JSON text."""
    doc = copy.deepcopy(base)
    parent, key, node = None, None, doc
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):  # descend at random
        key = draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
        parent, node = node, node[key]
    op = draw(st.sampled_from(["replace", "delete", "wrap", "duplicate"]))
    if parent is None:
        doc = draw(json_value()) if op in ("replace", "delete") else [doc] if op == "wrap" else [doc, doc]
    elif op == "replace":
        parent[key] = draw(json_value())
    elif op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [node]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    else:
        parent[key] = [node, node]
    return json.dumps(doc).replace('"@DEEP@"', DEEP)


@st.composite
def mutated_bytes(draw, data: bytes, hot: int = 0) -> bytes:
    """Truncated, bytes flipped (half of them within the first `hot` bytes: a header), or junk inserted."""
    op = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if op == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    where = st.integers(0, len(data) - 1)
    if hot:
        where = st.one_of(st.integers(0, min(hot, len(data)) - 1), where)
    out = bytearray(data)
    if op == "flip":
        for i in draw(st.lists(where, min_size=1, max_size=6)):
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    i = draw(where)
    return bytes(out[:i]) + draw(st.binary(min_size=1, max_size=12)) + bytes(out[i:])


def write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header: for claims the writer would refuse to make."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data
