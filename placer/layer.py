"""One MoE layer's placement problem and the integer bookkeeping the solvers share.

Units: a workload's load is scaled so that the mean GPU load is 1.0, then stored as integers in
units of 1/SCALE (CP-SAT needs integers; 1e-5 of the mean is far below trace noise). The objective
of a packing is

    hottest GPU load over all workloads  +  traffic_weight * traffic  +  move_weight * moved / E

traffic = share of the layer's routed (token, expert) pairs whose expert has no replica on its
routing group's home node. With DeepSeek-V3's group-limited routing a token's 8 experts come from 4
of 8 groups; each group gets a home node (groups packed onto nodes by load, as EPLB's hierarchical
policy does), and every expert kept at home keeps its tokens' traffic on that node. Unlike "nodes a
group spans", the term falls one expert at a time, so local search can trade it against balance.
moved = (expert, GPU) pairs of the new layout whose GPU did not hold that expert before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE = 100_000


@dataclass(frozen=True)
class LayerProblem:
    """share_WE [W, E]: each workload's share of the layer's routed tokens per expert (rows sum to 1).
    replicas_E [E]: replica count per expert (sums to num_gpus * slots_per_gpu).
    home_node_E [E]: home node of each expert's routing group, or None for no traffic term.
    old_on_GE [G, E]: where the previous placement kept each expert, or None."""

    share_WE: np.ndarray
    replicas_E: np.ndarray
    num_gpus: int
    gpus_per_node: int
    slots_per_gpu: int
    home_node_E: np.ndarray | None = None
    old_on_GE: np.ndarray | None = None
    traffic_weight: float = 0.0
    move_weight: float = 0.0
    # SGLang's static dispatch gives an expert's replicas equal shares only on distinct nodes: keep an
    # expert with at most one replica per node from a second one on a node (never create one).
    spread_nodes: bool = False

    def __post_init__(self) -> None:
        W, E = self.share_WE.shape
        assert np.allclose(self.share_WE.sum(1), 1.0), "each workload's shares must sum to 1"
        assert self.replicas_E.shape == (E,) and self.replicas_E.min() >= 1
        assert self.replicas_E.sum() == self.num_gpus * self.slots_per_gpu, "replicas must fill every slot"
        assert self.replicas_E.max() <= self.num_gpus, "at most one replica of an expert per GPU"
        assert self.num_gpus % self.gpus_per_node == 0
        if self.old_on_GE is not None:
            assert self.old_on_GE.shape == (self.num_gpus, E)

    @property
    def num_experts(self) -> int:
        return self.share_WE.shape[1]

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def replica_load_WE(self) -> np.ndarray:
        """[W, E] integer load of one replica, equal split across an expert's replicas."""
        return np.rint(self.share_WE * self.num_gpus / self.replicas_E * SCALE).astype(np.int64)

    def traffic_weight_E(self) -> np.ndarray:
        """[E] integer objective cost of expert e having no replica on its home node (zeros without homes)."""
        if self.home_node_E is None:
            return np.zeros(self.num_experts, dtype=np.int64)
        return np.rint(self.traffic_weight * self.share_WE.mean(0) * SCALE).astype(np.int64)

    def move_weight_int(self) -> int:
        if self.old_on_GE is None:
            return 0
        return int(round(self.move_weight / self.num_experts * SCALE))

    def lower_bound(self) -> float:
        """A bound on the hottest GPU load that holds for any placement with these slots: the mean
        (1.0), and the hottest expert spread over as many replicas as it could possibly get."""
        G, E = self.num_gpus, self.num_experts
        most_replicas = min(G, G * self.slots_per_gpu - E + 1)
        return float(max(1.0, (self.share_WE.max() * G / most_replicas)))


class Packing:
    """Mutable working state of one layer's search: which experts each GPU holds and the integer
    quantities the objective is made of. Transient: it never leaves the layer solver."""

    def __init__(self, problem: LayerProblem, gpu_experts_GS: np.ndarray) -> None:
        self.problem = problem
        self.load_WE = problem.replica_load_WE()
        self.traffic_E = problem.traffic_weight_E()
        self.move_int = problem.move_weight_int()
        self.gpu_experts = gpu_experts_GS.copy()
        G, E = problem.num_gpus, problem.num_experts
        self.on_GE = np.zeros((G, E), dtype=bool)
        np.put_along_axis(self.on_GE, self.gpu_experts, True, axis=1)
        assert self.on_GE.sum() == self.gpu_experts.size, "two replicas of one expert share a GPU"
        assert (self.on_GE.sum(0) == problem.replicas_E).all(), "packing does not match replica counts"
        self.load_WG = self.load_WE[:, self.gpu_experts].sum(axis=2)
        self.node_G = np.arange(G) // problem.gpus_per_node

    # -- objective parts -------------------------------------------------------------------
    def hottest(self) -> int:
        return int(self.load_WG.max())

    def home_count_E(self) -> np.ndarray:
        """[E] replicas of each expert on its home node (all ones-or-more without homes)."""
        p = self.problem
        if p.home_node_E is None:
            return np.ones(p.num_experts, dtype=np.int64)
        on_NE = self.on_GE.reshape(p.num_nodes, p.gpus_per_node, -1).sum(axis=1)
        return on_NE[p.home_node_E, np.arange(p.num_experts)]

    def traffic(self) -> int:
        """Integer traffic term: weights of the experts with no replica at home."""
        return int(self.traffic_E[self.home_count_E() == 0].sum())

    def off_home_share(self) -> float:
        """Share of routed (token, expert) pairs whose expert has no replica on its home node."""
        if self.problem.home_node_E is None:
            return 0.0
        return float(self.problem.share_WE.mean(0)[self.home_count_E() == 0].sum())

    def spread_E(self) -> np.ndarray:
        """[E] experts that must not get two replicas on one node (all False unless spread_nodes)."""
        return self.problem.spread_nodes & (self.problem.replicas_E <= self.problem.num_nodes)

    def on_NE(self) -> np.ndarray:
        """[N, E] replicas of each expert on each node."""
        p = self.problem
        return self.on_GE.reshape(p.num_nodes, p.gpus_per_node, -1).sum(axis=1)

    def moved(self) -> int:
        if self.problem.old_on_GE is None:
            return 0
        return int((self.on_GE & ~self.problem.old_on_GE).sum())

    def objective(self) -> int:
        return self.hottest() + self.traffic() + self.move_int * self.moved()

    # -- changes ---------------------------------------------------------------------------
    def replace_rows(self, gpus: np.ndarray, rows_KS: np.ndarray) -> None:
        """Give the GPUs `gpus` the expert rows `rows_KS` (a re-partition of what they held)."""
        old = self.gpu_experts[gpus]
        assert sorted(old.ravel().tolist()) == sorted(rows_KS.ravel().tolist()), "not a re-partition"
        self.on_GE[gpus[:, None], old] = False
        self.on_GE[gpus[:, None], rows_KS] = True
        self.gpu_experts[gpus] = rows_KS
        self.load_WG[:, gpus] = self.load_WE[:, rows_KS].sum(axis=2)

    def swap(self, g: int, i: int, h: int, j: int) -> None:
        """Exchange slot i of GPU g with slot j of GPU h."""
        a, b = self.gpu_experts[g, i], self.gpu_experts[h, j]
        rows = self.gpu_experts[[g, h]].copy()
        rows[0, i], rows[1, j] = b, a
        self.replace_rows(np.array([g, h]), rows)
