"""Prometheus series of one server: steps, requests, tokens, per-layer balance, per-rank load, reshards."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeplace.reshard_job import JobState, JobStatus
from moeplace.runtime.engine_stats import StatsWindow, StepStats
from moeplace.runtime.recorder import Recorder


class Metrics:
    """Prometheus series of one server (own registry: no process-global state)."""

    def __init__(self, model, recorder: Recorder | None = None) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("moeplace_step_seconds", "Wall time of one engine step", registry=self.registry)
        self.requests = Counter("moeplace_requests", "Completion requests by outcome", ["outcome"], registry=self.registry)
        self.tokens = Counter("moeplace_generated_tokens", "Tokens generated", registry=self.registry)
        self.balancedness = Gauge("moeplace_layer_balancedness", "Mean / max GPU load of each MoE layer over the "
                                  "last collected window (about a second)", ["layer"], registry=self.registry)
        self.rank_tokens = Counter("moeplace_rank_routed_tokens", "Routed (token, expert) pairs served per rank",
                                   ["rank"], registry=self.registry)
        self.reshards = Gauge("moeplace_reshard_jobs", "Reshard jobs by state", ["state"], registry=self.registry)
        self.reshard_layers = Gauge("moeplace_reshard_layers_done", "Layers swapped by the newest reshard",
                                    registry=self.registry)
        self.model = model
        self.recorder = recorder

    def observe_reshards(self, jobs: list[JobStatus]) -> None:
        """Scrape time: how many reshards ended in each state, and the newest one's progress."""
        for state in JobState:
            self.reshards.labels(state=state.value).set(sum(j.state is state for j in jobs))
        if jobs:
            self.reshard_layers.set(max(jobs, key=lambda j: j.started).layers_done)

    def observe_step(self, stats: StepStats) -> None:
        self.step_seconds.observe(stats.seconds)
        self.tokens.inc(stats.batch)

    def observe_window(self, window: StatsWindow) -> None:
        """A collected window of expert statistics (about one a second): recorder, balance, per-rank load."""
        stats = window.stats
        if self.recorder is not None:
            self.recorder.add(window.start, window.tokens, stats.counts_LE, stats.samples_TLK)
        for layer, load_G in zip(self.model.config.moe_layers, stats.gpu_load_LG):
            if load_G.sum() > 0:
                self.balancedness.labels(layer=str(layer)).set(float(load_G.mean() / load_G.max()))
            for rank, value in enumerate(load_G.tolist()):
                self.rank_tokens.labels(rank=str(rank)).inc(value)
