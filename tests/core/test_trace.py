"""The data model's Trace: each constraint feasible and infeasible, every error message pinned."""

from __future__ import annotations

import re

import numpy as np
import pytest

from moeplace.trace import Trace

RNG = np.random.default_rng(11)


def raises(message: str):
    return pytest.raises(ValueError, match=re.escape(message))


# ---------------------------------------------------------------- Trace


def counts(W=2, L=3, E=8) -> np.ndarray:
    return RNG.integers(1, 100, size=(W, L, E)).astype(np.float64)


def test_trace_feasible():
    c = counts()
    ids = RNG.integers(-1, 8, size=(5, 3, 2))
    trace = Trace(c, np.array([3, 4, 7]), top_k=2, topk_ids_TLK=ids, tokens_W=np.array([10, 20]),
                  num_model_layers=8, n_group=4, topk_group=2)
    assert (trace.num_windows, trace.num_layers, trace.num_experts) == (2, 3, 8)
    assert trace.counts_WLE.dtype == np.float64 and trace.topk_ids_TLK.dtype == np.int64
    assert trace.digest() == Trace(c.copy(), np.array([3, 4, 7]), top_k=2).digest()
    c2 = c.copy()
    c2[0, 0, 0] += 1
    assert trace.digest() != Trace(c2, np.array([3, 4, 7]), top_k=2).digest()


@pytest.mark.parametrize(
    "value, text",
    [
        (np.nan, "Trace: field 'counts_WLE' holds nan at index [1, 2, 5] (NaN/inf)"),
        (np.inf, "Trace: field 'counts_WLE' holds inf at index [1, 2, 5] (NaN/inf)"),
        (-np.inf, "Trace: field 'counts_WLE' holds -inf at index [1, 2, 5] (NaN/inf)"),
        (-3.0, "Trace: field 'counts_WLE' holds negative count -3.0 at index [1, 2, 5]"),
    ],
)
def test_trace_counts_finite_and_non_negative(value, text):
    c = counts()
    c[1, 2, 5] = value
    with raises(text):
        Trace(c, np.array([3, 4, 5]), top_k=2)


@pytest.mark.parametrize("bad", [8, -2])
def test_trace_topk_ids_in_range(bad):
    ids = RNG.integers(-1, 8, size=(4, 3, 2))
    Trace(counts(), np.array([3, 4, 5]), top_k=2, topk_ids_TLK=ids)
    ids[2, 1, 0] = bad
    with raises(f"Trace: field 'topk_ids_TLK' holds {bad} at index [2, 1, 0], outside [-1, 8)"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, topk_ids_TLK=ids)


def test_trace_topk_ids_shape_follows_top_k():
    with raises("Trace: field 'topk_ids_TLK' has shape [4, 3, 3], expected 2 along axis 2"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, topk_ids_TLK=np.zeros((4, 3, 3), dtype=np.int64))


@pytest.mark.parametrize("layers", [[3, 3, 4], [5, 4, 6], [-1, 0, 1]])
def test_trace_layers_increasing(layers):
    with raises(f"Trace: field 'layers' must be non-negative and increasing, got {layers}"):
        Trace(counts(), np.array(layers), top_k=2)


def test_trace_other_fields():
    with raises("my.pt: field 'layers' has shape [2], expected 3 along axis 0"):
        Trace(counts(), np.array([3, 4]), top_k=2, source="my.pt")
    with raises("Trace: field 'top_k' is 9, more than the 8 experts"):
        Trace(counts(), np.array([3, 4, 5]), top_k=9)
    with raises("Trace: field 'top_k' must be a positive integer, got 0"):
        Trace(counts(), np.array([3, 4, 5]), top_k=0)
    with raises("Trace: layer id 5 is not below num_model_layers 5"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, num_model_layers=5)
    with raises("Trace: n_group 3 / topk_group 1 do not fit 8 experts"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, n_group=3)
    with raises("Trace: n_group 2 / topk_group 4 do not fit 8 experts"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, n_group=2, topk_group=4)
    with raises("Trace: field 'counts_WLE' is empty, shape [0, 3, 8]"):
        Trace(np.zeros((0, 3, 8)), np.array([3, 4, 5]), top_k=2)
    with raises("Trace: field 'tokens_W' holds negative count -1.0 at index [1]"):
        Trace(counts(), np.array([3, 4, 5]), top_k=2, tokens_W=np.array([1.0, -1.0]))
    with raises("Trace: field 'layers' must be integers, got dtype float64"):
        Trace(counts(), np.array([3.0, 4.0, 5.0]), top_k=2)
