"""Expert-load recorder on rank 0: windows of per-logical-expert counts, with times and token counts.

The engine collects the ranks' device-side counters about once a second (EPModel.collect_stats: one
all_reduce and one copy to the host per collect, none per step) and hands each collected window to
`add`; the recorder merges them into windows of `window_seconds` with their start time and token
count, and hands them out as a moeplace `Trace`. Physical slots never appear: counts are per logical
expert whatever placement was live.
"""

from __future__ import annotations

import threading

import numpy as np

from moeplace.trace import Trace


class Recorder:
    def __init__(self, layers: list[int], num_experts: int, top_k: int, num_model_layers: int,
                 n_group: int = 1, topk_group: int = 1) -> None:
        self.layers, self.E, self.top_k = np.asarray(layers), num_experts, top_k
        self.num_model_layers, self.n_group, self.topk_group = num_model_layers, n_group, topk_group
        self.window_seconds = 1.0
        self.sample_rate = 0.0
        self.max_samples = 8192  # bounds the memory of a long recording
        self.max_windows = 4096  # a ring: the oldest windows go first
        self.recording = False
        self._samples: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._windows: list[tuple[float, float, np.ndarray]] = []  # (start, tokens, counts [L, E])

    def start(self, window_seconds: float = 1.0, sample_rate: float = 0.0) -> None:
        if not 0.01 <= window_seconds <= 3600:
            raise ValueError(f"window_seconds must be in [0.01, 3600], got {window_seconds}")
        if not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        with self._lock:
            self.window_seconds, self.sample_rate, self.recording = window_seconds, sample_rate, True
            self._windows, self._samples = [], []

    def stop(self) -> None:
        self.recording = False

    def add(self, start: float, tokens: int, counts_LE: np.ndarray, sample_TLK: np.ndarray | None = None) -> None:
        """One collected span of steps that began at `start` (seconds since the epoch): its global counts,
        its token count, and optionally sampled tokens' top-k ids (the engine's thread)."""
        if not self.recording:
            return
        with self._lock:
            if sample_TLK is not None and len(sample_TLK):
                room = self.max_samples - sum(map(len, self._samples))
                if room > 0:
                    self._samples.append(sample_TLK[:room])
            if not self._windows or start - self._windows[-1][0] >= self.window_seconds:
                self._windows.append((start, 0.0, np.zeros((len(self.layers), self.E))))
                del self._windows[: -self.max_windows]
            first, seen, counts = self._windows[-1]
            self._windows[-1] = (first, seen + tokens, counts + counts_LE)

    def trace(self, metadata: dict[str, str]) -> Trace:
        """The recorded windows; ValueError when nothing was recorded."""
        with self._lock:
            windows, samples = list(self._windows), list(self._samples)
        if not windows:
            raise ValueError("nothing recorded: POST /moeplace/profile/start, send requests, then dump")
        return Trace(
            counts_WLE=np.stack([w[2] for w in windows]),
            layers=self.layers,
            top_k=self.top_k,
            topk_ids_TLK=np.concatenate(samples)[: self.max_samples] if samples else None,
            tokens_W=np.array([w[1] for w in windows]),
            time_W=np.array([w[0] for w in windows]),
            num_model_layers=self.num_model_layers,
            n_group=self.n_group,
            topk_group=self.topk_group,
            metadata=metadata,
            source="live profile",
        )
