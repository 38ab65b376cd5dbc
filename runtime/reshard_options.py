"""How a live reshard may use the machine: transfer timeout, rate limit, staging budget (`ReshardOptions`),
and the `Pacer` that keeps transfers to the rate limit.

From the environment of `moeplace serve` (every rank reads the same):
  MOEPLACE_RESHARD_TIMEOUT   seconds a layer's transfers may take (default 60)
  MOEPLACE_RESHARD_RATE      bytes/s one GPU may move (the larger of sent and received), 0 = unlimited;
                             an operator trades reshard time for serving slowdown (BENCHMARKS.md has
                             the measured frontier; the default is chosen from it)
  MOEPLACE_RESHARD_STAGING   bytes of staging one GPU may hold for layers in flight (default: two layers
                             of this GPU's slots, at least 8 GiB: any plan's layers then go two at a time;
                             8 GiB on every rank where the larger default does not fit one)
  MOEPLACE_RESHARD_COPY_ENGINE  1 (default): between GPUs of one node, peer copies through CUDA IPC
                             (copy engines: no SM runs a kernel for them), NCCL across nodes;
                             0: NCCL everywhere
  MOEPLACE_RESHARD_COPY_STREAMS  streams a rank's peer copies go round-robin over (default 1)
  MOEPLACE_RESHARD_COPY_BATCH  1 (default): a stream's peer copies of a pull in one driver call where the
                             driver has cuMemcpyBatchAsync (CUDA 12.8+); 0: one driver call per copy
  MOEPLACE_RESHARD_PRIORITY  1 (default): the reshard's streams (copies, their gathers, checksums) run at
                             high priority, so its small kernels pass a busy step's queued blocks; 0: the
                             serving streams' priority
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

DEFAULT_RATE = 0.0  # unlimited until measured: see BENCHMARKS.md, "live reshard frontier"
DEFAULT_STAGING = 8 << 30


@dataclass(frozen=True, kw_only=True)
class ReshardOptions:
    """timeout_s > 0; rate_bytes_per_s >= 0 (0 = unlimited); staging_bytes > 0; chunk_experts >= 1:
    experts per peer posted together, the pieces whose checksums run as they land: under a rate limit
    the pacing granularity (8), unlimited a whole layer. Smaller pieces shorten the last layer's check
    (~1 ms in the benchmark) but each costs the reshard thread more calls. high_priority: the reshard's
    CUDA streams at the device's highest priority (`stream_priority`)."""

    timeout_s: float = 60.0
    rate_bytes_per_s: float = DEFAULT_RATE
    staging_bytes: int | None = None  # None: `default_staging` of the model, chosen by the Resharder
    chunk_experts: int = 1 << 30
    copy_engine: bool = True
    copy_streams: int = 1
    copy_batch: bool = True
    high_priority: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout_s", "staging_bytes", "chunk_experts", "copy_streams"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"reshard option {name} must be > 0, got {getattr(self, name)}")
        if not self.rate_bytes_per_s >= 0 or not math.isfinite(self.rate_bytes_per_s):
            raise ValueError(f"reshard option rate_bytes_per_s must be >= 0, got {self.rate_bytes_per_s}")

    @property
    def stream_priority(self) -> int:
        """The priority of the reshard's CUDA streams (lower is higher; torch maps -1 to the device's
        highest): in a busy step the SMs are full, and a layer's gathers and checksum kernels, queued
        at normal priority, waited for the step's blocks ahead of them."""
        return -1 if self.high_priority else 0

    @classmethod
    def from_env(cls, env=None, **overrides) -> ReshardOptions:
        """From MOEPLACE_RESHARD_* (ValueError naming the variable and its value); `overrides` win."""
        env = os.environ if env is None else env
        values = {"timeout_s": _number(env, "MOEPLACE_RESHARD_TIMEOUT", 60.0, positive=True),
                  "rate_bytes_per_s": _number(env, "MOEPLACE_RESHARD_RATE", DEFAULT_RATE, positive=False),
                  "staging_bytes": _whole(_number(env, "MOEPLACE_RESHARD_STAGING", math.nan, positive=True)),
                  "copy_engine": _flag(env, "MOEPLACE_RESHARD_COPY_ENGINE", default="1"),
                  "copy_streams": _count(env, "MOEPLACE_RESHARD_COPY_STREAMS", 1),
                  "copy_batch": _flag(env, "MOEPLACE_RESHARD_COPY_BATCH", default="1"),
                  "high_priority": _flag(env, "MOEPLACE_RESHARD_PRIORITY", default="1")}
        values.update(overrides)
        if values["rate_bytes_per_s"] > 0 and "chunk_experts" not in overrides:
            # pacing spreads chunks of 8 experts per peer (~350 MB at DeepSeek-V3 size, ~1 ms of NVLink),
            # not whole layers; each chunk's post wakes the reshard thread, which then takes the GIL from
            # the serving thread: chunks of 2 woke it 4x as often (BENCHMARKS.md, live reshard frontier)
            values["chunk_experts"] = 8
        return cls(**values)


def default_staging(slots: int, expert_bytes: int) -> int:
    """Two layers of a GPU's `slots` (what a layer can stage at most, with copy engines), at least 8 GiB.
    A fixed 8 GiB held under two layers where a GPU holds many slots (EP2 at DeepSeek-V3 size: 5.7 GB a
    layer), and each layer then waited for the previous one's install at a step boundary."""
    return max(DEFAULT_STAGING, 2 * slots * expert_bytes)


def _whole(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def _flag(env, name: str, default: str) -> bool:
    raw = env.get(name, default)
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _count(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise ValueError(f"{name} must be a whole number from 1 to 16, got {raw!r}")
    return int(raw)


def _number(env, name: str, default: float, positive: bool) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = "a positive number" if positive else "a number >= 0"
        unit = " of seconds" if name.endswith("TIMEOUT") else ""
        raise ValueError(f"{name} must be {what}{unit}, got {raw!r}")
    return value


class Pacer:
    """Holds posts back so that the bytes posted since the first stay within `rate` bytes/s (0: never)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.start, self.posted = rate, None, 0

    def wait(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        if self.start is None:
            self.start = now
        due = self.start + self.posted / self.rate
        if due > now:
            time.sleep(due - now)
        self.posted += nbytes
