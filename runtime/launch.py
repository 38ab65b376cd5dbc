"""Entry point of one rank (`moeplace serve` starts P of them: runtime/supervise.py, or torchrun).

    MOEPLACE_SERVE_CONFIG='{...}' RANK=r WORLD_SIZE=P ... python -m moeplace.runtime.launch

The options come as one JSON `ServeConfig` in the environment (declared once, by the CLI; the API key
never reaches a command line). Rank 0 serves HTTP and schedules; the other ranks follow its steps.
Stopping: SIGTERM or SIGINT makes rank 0 fail its in-flight requests, tell every rank to stop and
exit 0; a rank still running `GRACE_S` seconds after the signal exits anyway.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_ENV = "MOEPLACE_SERVE_CONFIG"
STORE_ENV = "MOEPLACE_STORE"  # host:port of a TCPStore the supervisor already serves (single node)
GRACE_S = 6.0  # after a stop signal, the most a rank waits for the orderly way out
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What `moeplace serve` was asked for (the CLI declares and documents each option)."""

    model: Path | None = None
    placement: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    gpus_per_node: int = 0  # 0: every rank on one node
    api_key: str | None = None
    max_batch: int = 8
    queue_limit: int = 64  # requests waiting beyond max_batch; more are answered 503 with Retry-After
    log_level: str = "warning"  # "info": one access-log line per request
    read_timeout: float = 10.0  # seconds a client has to send a whole request (headers and body)

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.read_timeout <= 3600:
            raise ValueError(f"--read-timeout must be in (0, 3600] seconds, got {self.read_timeout}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"binding to {self.host} (not loopback) requires --api-key")
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"{self.model}: not a model folder (no config.json)")

    def to_json(self) -> str:
        return json.dumps({k: None if v is None else str(v) if isinstance(v, Path) else v
                           for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        fields = json.loads(text)
        for name in ("model", "placement"):
            fields[name] = None if fields[name] is None else Path(fields[name])
        return cls(**fields)

    @property
    def model_name(self) -> str:
        """The name /v1/models lists and requests may ask for."""
        return self.model.name if self.model is not None else "moeplace-tiny-dsv3"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(faults=None) -> None:
    """One rank. `faults`: a reshard FaultPlan, from tests only (tests/support/faulty_rank.py)."""
    import torch

    config = ServeConfig.from_json(os.environ[CONFIG_ENV])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stop = StopSignal(rank)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group("nccl" if device.type == "cuda" else "gloo", rank, world)
    code = run_rank(config, rank, world, device, stop, faults)
    # Skip the interpreter's teardown of torch and the model (seconds of freeing on a loaded machine):
    # the process is done, and a stop must be over within 10 s.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_rank(config: ServeConfig, rank: int, world: int, device, stop: StopSignal, faults=None) -> int:
    """Load this rank's part of the model, then serve (rank 0) or follow (the others): the exit status."""
    import torch.distributed as dist

    # Control messages (the batch of each step) travel on gloo whatever the data backend; a live
    # reshard moves weights on a group of its own so its transfers never queue behind a step's.
    control = dist.new_group(backend="gloo")
    reshard_group = dist.new_group(backend="gloo" if device.type == "cpu" else "nccl")
    code = 1
    try:
        try:
            model, tokenizer = load_model(config, world, device)
        except ValueError as exc:  # raised on every rank (the load is collective): one line, from rank 0
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        from moeplace.runtime.reshard import Resharder

        # On GPUs the reshard's agreements and handshakes go on gloo: a rank waiting there waits on the host.
        reshard_control = dist.new_group(backend="gloo") if device.type == "cuda" else None
        resharder = Resharder(model, reshard_group, rank, control=reshard_control, faults=faults)
        try:
            resharder.connect()
        except ValueError as exc:  # the staging budget does not fit: raised on every rank alike
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        if rank == 0:
            from moeplace.runtime.serving import serve

            code = serve(config, model, tokenizer, control, resharder, stop, world)
        else:
            code = _follow(model, control, resharder, stop, rank, config)
        return code
    finally:
        if code == 0:  # a failed rank skips it: the others may never join the teardown
            dist.destroy_process_group()


def _init_process_group(backend: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    if STORE_ENV not in os.environ:  # under torchrun: its rendezvous
        dist.init_process_group(backend)
        return
    host, port = os.environ[STORE_ENV].rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _follow(model, control, resharder, stop: StopSignal, rank: int, config: ServeConfig) -> int:
    from moeplace.runtime.ranks import worker_loop

    try:
        worker_loop(model, control, engine_config(config), resharder)
    except Exception as exc:  # noqa: BLE001 - rank 0 (or a peer) went away: one line, not a traceback
        if stop.received is None:
            print(f"error: rank {rank} stopped: {exc.__class__.__name__}: {exc}"[:500], file=sys.stderr, flush=True)
        return 1
    return 0


class StopSignal:
    """SIGTERM / SIGINT handling of one rank. `on_stop` (set by rank 0's server) starts the orderly
    shutdown in the main thread; a watchdog thread, woken through the signal wakeup fd even while the
    main thread is blocked in a collective, ends the process `GRACE_S` seconds later if it still runs.
    When the supervisor dies first, the kernel sends SIGTERM (PR_SET_PDEATHSIG)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.received, self.on_stop = rank, None, None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        threading.Thread(target=self._watchdog, args=(read_fd,), name="stop-watchdog", daemon=True).start()
        _die_with_parent()

    def _handle(self, signum, _frame) -> None:
        first = self.received is None
        self.received = signum
        if first and self.on_stop is not None:
            self.on_stop()

    def _watchdog(self, read_fd: int) -> None:
        signum = os.read(read_fd, 1)[0]
        time.sleep(GRACE_S)
        os.write(2, f"error: rank {self.rank} did not stop within {GRACE_S:.0f} s of signal {signum}\n".encode())
        os._exit(128 + signum)


def _die_with_parent() -> None:
    """Linux: SIGTERM to this rank when the process that started it ends, even by SIGKILL."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def load_model(config: ServeConfig, world: int, device):
    import torch.distributed as dist

    from moeplace.placement import load_placement
    from moeplace.runtime.model import EPModel
    from moeplace.runtime.tiny import default_model_dir
    from moeplace.runtime.tokenizer import ByteTokenizer

    model_dir = config.model or default_model_dir()
    placement = load_placement(config.placement) if config.placement else None
    model = EPModel.load(model_dir, placement, group=dist.group.WORLD, device=device,
                         gpus_per_node=config.gpus_per_node or world)
    return model, ByteTokenizer()


def engine_config(config: ServeConfig):
    """The engine's limits, the same on every rank (each sizes its own KV cache from them)."""
    from moeplace.runtime.ranks import EngineConfig

    return EngineConfig(max_batch=config.max_batch, queue_limit=config.queue_limit)


if __name__ == "__main__":
    main()
