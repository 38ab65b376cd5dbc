"""Dispatch rules: SGLang's static tables on hand-worked layouts (each rule of its code exercised),
their invariants on random layouts, the shares each rule gives, and, when SGLang's wheel is at hand,
agreement with SGLang's own functions read from it."""

from __future__ import annotations

import ast
import os
import random
import types
import typing
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moeplace.placement import Placement
from moeplace.placer.dispatch import Dispatch, dispatch_model, sglang_rows, sglang_static_choice
from moeplace.topology import Topology


def ranks_per_slot(rows_MP: np.ndarray, E: int, G: int, per_node: int) -> np.ndarray:
    choice_GME = sglang_static_choice(rows_MP, E, G, per_node)
    out = np.zeros(rows_MP.shape, dtype=int)
    for m in range(rows_MP.shape[0]):
        out[m] = np.bincount(choice_GME[:, m].ravel(), minlength=rows_MP.shape[1])
    return out


def test_own_gpu_then_own_node_then_a_fair_deal():
    # 4 ranks, 2 nodes of 2, 2 slots each. Expert 0 on GPUs 0 and 1 (slots 0, 2: both on node 0):
    # ranks 0, 1 use their own; node 1 has none, so ranks 2, 3 are dealt the two slots, one each.
    # Expert 1 on GPUs 0 and 2 (slots 1, 4): each rank its own GPU's or its node's.
    rows = np.array([[0, 1, 0, 2, 1, 3, 4, 5]])
    choice = sglang_static_choice(rows, 6, 4, 2)[:, 0]
    assert choice[:, 1].tolist() == [1, 1, 4, 4]
    assert choice[0, 0] == 0 and choice[1, 0] == 2
    assert sorted(choice[2:, 0].tolist()) == [0, 2]
    assert choice[:, 2:].tolist() == [[3, 5, 6, 7]] * 4  # one replica: every rank sends there
    assert ranks_per_slot(rows, 6, 4, 2).tolist() == [[2, 2, 2, 4, 2, 4, 4, 4]]


def test_first_replica_on_the_node_when_it_narrows_the_choice():
    # 6 ranks, 2 nodes of 3, one slot each. Expert 0 on GPUs 0, 1 (node 0) and 3 (node 1).
    # Rank 2 has none on its GPU; node 0 holds 2 of the 3 candidates: it takes the first, slot 0.
    # Ranks 4, 5 take node 1's slot 3.
    rows = np.array([[0, 0, 1, 0, 2, 3]])
    choice = sglang_static_choice(rows, 4, 6, 3)[:, 0, 0]
    assert choice.tolist() == [0, 1, 0, 3, 3, 3]


def test_all_candidates_on_the_rank_node_do_not_narrow():
    # Expert 0 on GPUs 0 and 1 of node 0 (3 GPUs per node): rank 2 gets no node preference and is
    # dealt a slot with the ranks of node 1 (4 ranks, 2 candidates: two each).
    rows = np.array([[0, 0, 1, 2, 3, 4]])
    choice = sglang_static_choice(rows, 5, 6, 3)[:, 0, 0]
    assert choice[:2].tolist() == [0, 1]
    assert sorted(choice[2:].tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("seed", range(3))
def test_tables_are_valid_on_random_layouts(seed):
    rng = np.random.default_rng(seed)
    E, G, per_node, S = 16, 8, 4, 3
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, G * S - E, replace=False)]))
                     for _ in range(4)])
    choice = sglang_static_choice(rows, E, G, per_node)
    for m in range(4):
        for e in range(E):
            slots = np.flatnonzero(rows[m] == e)
            assert set(choice[:, m, e].tolist()) <= set(slots.tolist())
            for g in range(G):  # a rank holding the expert uses its own copy
                mine = slots[slots // S == g]
                if len(mine):
                    assert choice[g, m, e] == mine[0]
    # deterministic: the same seed, the same tables
    np.testing.assert_array_equal(choice, sglang_static_choice(rows, E, G, per_node))


def test_shares_under_each_rule():
    topo = Topology(4, 2, 2)
    split = np.array([[0.75, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0]])
    p = Placement(np.array([[0, 1, 0, 2, 3, 4, 5, 6]]), 7, topo, np.array([1]), num_model_layers=2, split_LP=split)
    equal = dispatch_model(p, Dispatch.equal).shares_LP
    assert equal[0, [0, 2]].tolist() == [0.5, 0.5] and (equal[0, [1, 3, 4, 5, 6, 7]] == 1).all()
    np.testing.assert_array_equal(dispatch_model(p, Dispatch.split).shares_LP, split)
    static = dispatch_model(p, Dispatch.sglang_static)
    assert static.shares_LP[0, [0, 2]].tolist() == [0.5, 0.5]  # ranks 0, 1 own; 2, 3 dealt one each
    assert static.choice_GLE.shape == (4, 1, 7)
    # SGLang's map has a row per model layer; the one the placement lacks is trivial (p % E)
    assert sglang_rows(p).tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 0, 2, 3, 4, 5, 6]]


def _sglang_functions(wheel: Path, ep_size: int, nnodes: int) -> dict:
    """SGLang's own dispatch functions, read from its wheel at run time (never copied here)."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("sglang/srt/eplb/expert_location.py").decode()
    wanted = {"compute_logical_to_rank_dispatch_physical_map", "_logical_to_all_physical_raw",
              "_compute_gpu_id_of_physical_expert", "_compute_node_id_of_physical_expert", "_find_nearest_expert",
              "_fair_choices", "_compute_logical_to_all_physical_map", "_pad_nested_array"}
    tree = ast.parse(source)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    import torch

    ns = {"torch": torch, "random": random, "List": typing.List, "Optional": typing.Optional,
          "get_parallel": lambda: types.SimpleNamespace(ep_size=ep_size, nnodes=nnodes),
          "get_exec": lambda: types.SimpleNamespace(moe=types.SimpleNamespace(moe_a2a_backend="deepep")),
          "_prefer_same_node_experts": lambda: True}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(wheel), "exec"), ns)  # noqa: S102
    return ns


SGLANG_WHEEL = Path(os.environ.get("SGLANG_WHEEL", "/tmp/engines/sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl"))


@pytest.mark.skipif(not SGLANG_WHEEL.is_file(), reason="needs SGLang 0.5.23's wheel (pip download --no-deps sglang==0.5.23)")
@pytest.mark.parametrize("G, nodes", [(8, 2), (32, 4)])
def test_agrees_with_sglang_own_code(G, nodes):
    import torch

    ns = _sglang_functions(SGLANG_WHEEL, G, nodes)
    rng = np.random.default_rng(G)
    E, P = 64, 64 + G
    rows = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.choice(E, P - E)])) for _ in range(3)])
    theirs = []
    for rank in range(G):  # each rank builds its own table (moe_ep_rank set), as at start-up
        per_rank = ns["_compute_logical_to_all_physical_map"](torch.tensor(rows), E, G, rank)
        theirs.append(ns["compute_logical_to_rank_dispatch_physical_map"](per_rank, G, P, rank).numpy())
    np.testing.assert_array_equal(sglang_static_choice(rows, E, G, G // nodes), np.stack(theirs))


@pytest.mark.parametrize("with_old", [False, True])
def test_solving_for_static_dispatch_reports_what_sglang_would_do(with_old):
    """The re-packing carries SGLang's tables along; the reported hottest must be what a fresh
    simulation of the final placement gives, and static planning must beat equal planning under it."""
    from moeplace.placer.evaluate import gpu_load_LG, imbalance
    from moeplace.placer.solve import SolveOptions, solve
    from moeplace.trace import Trace

    rng = np.random.default_rng(4)
    E, L = 32, 2
    base = rng.lognormal(0, 1.2, (L, E))
    traces = [Trace(base[None] * rng.lognormal(0, 0.2, (2, L, E)) * 1000, np.arange(1, 1 + L), 4,
                    num_model_layers=1 + L, n_group=4, topk_group=2, source=f"w{i}") for i in range(2)]
    topo = Topology(8, 2, 5)
    options = SolveOptions(time_limit=4.0, workers=1)
    old = solve(traces[:1], topo, options).placement if with_old else None
    static = solve(traces, topo, replace(options, dispatch=Dispatch.sglang_static), old=old)
    fresh = dispatch_model(static.placement, Dispatch.sglang_static)
    windows = [t.counts_WLE[w] for t in traces for w in range(2)]
    hottest = np.max([imbalance(gpu_load_LG(static.placement, c, fresh.shares_LP)) for c in windows], axis=0)
    np.testing.assert_allclose([r.hottest for r in static.reports], hottest, atol=1e-9)
    if old is None:
        equal = solve(traces, topo, options).placement
        under_static = dispatch_model(equal, Dispatch.sglang_static)
        equal_hottest = np.max([imbalance(gpu_load_LG(equal, c, under_static.shares_LP)) for c in windows], axis=0)
        assert hottest.mean() <= equal_hottest.mean() + 1e-9
