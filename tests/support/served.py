"""What the shared 2-rank server serves (tests/runtime/conftest.py `served`), and how tests talk to it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from moeplace.placement import save_placement
from moeplace.placer.solve import Method, SolveOptions, solve
from moeplace.readers import load_trace
from moeplace.resources import EXAMPLE_TRACE
from moeplace.topology import Topology
from moeplace.trace import Trace


def solved_placement(path: Path) -> Path:
    """A CP-SAT placement for 2 ranks x 36 slots (8 redundant) from the OLMoE counts the tiny model follows."""
    olmoe = load_trace(EXAMPLE_TRACE)
    trace = Trace(olmoe.counts_WLE, np.array([1, 2, 3]), 8, num_model_layers=4, n_group=8, topk_group=4,
                  source="olmoe-on-tiny")
    result = solve([trace], Topology(2, 1, 36), SolveOptions(method=Method.cpsat, time_limit=2, workers=1))
    assert (result.placement.replica_count_LE > 1).any()
    save_placement(result.placement, path)
    return path



def sse_events(response: httpx.Response) -> list[dict]:
    """A streamed answer read as OpenAI's format says: events separated by a blank line, each line
    `data: <JSON>`, the stream ends with `data: [DONE]` (asserted)."""
    events, done = [], False
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert not done, f"data after [DONE]: {block!r}"
        assert block.startswith("data: ") and "\n" not in block, block
        if block == "data: [DONE]":
            done = True
        else:
            events.append(json.loads(block[len("data: "):]))
    assert done, "the stream did not end with data: [DONE]"
    return events
