"""`moeplace serve`'s own process: check what it was given, start the ranks, stop them all.

1. `preflight`: the port, the device, the model folder and the placement, each failure a ValueError
   (one line from the CLI) before any rank starts.
2. `run_ranks`: on one node the ranks are started here (`moeplace.runtime.launch`, one process each,
   each in its own session so a terminal's Ctrl-C reaches only this process); their rendezvous store
   is served here on a socket bound to 127.0.0.1, and gloo/NCCL bootstrap on the loopback interface,
   so nothing of the server listens off loopback except the HTTP port asked for. With torchrun flags
   (several nodes) torchrun starts them instead, in its own session.
3. SIGTERM / SIGINT here is forwarded to every rank (rank 0 answers in-flight requests with an error
   and stops the others); any rank still there `KILL_AFTER_S` seconds later is killed, so the whole
   tree is gone within 10 s. A rank that exits with an error stops the others the same way; the exit
   status is the first failure's.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

from moeplace.runtime.launch import CONFIG_ENV, STORE_ENV, ServeConfig

KILL_AFTER_S = 8.0


def preflight(config: ServeConfig, nproc: int, torchrun_args: list[str]) -> None:
    """ValueError naming the problem with the port, device, model, placement or reshard options."""
    from moeplace.runtime.reshard_options import ReshardOptions

    ReshardOptions.from_env()  # MOEPLACE_RESHARD_*: every rank reads them at start
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if config.gpus_per_node and nproc % config.gpus_per_node and not torchrun_args:
        raise ValueError(f"--nproc {nproc} is not a multiple of --gpus-per-node {config.gpus_per_node}")
    check_port(config.host, config.port)
    if config.device == "cuda":
        check_cuda(nproc)
    check_model(config, None if torchrun_args else nproc)


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another server?); choose one with --port") from None
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def check_cuda(nproc: int) -> None:
    import torch

    if not torch.cuda.is_available():
        build = "this PyTorch has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device cuda: {build} (torch {torch.__version__}); serve with --device cpu")
    if torch.cuda.device_count() < nproc:
        raise ValueError(f"--device cuda: --nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")


def check_model(config: ServeConfig, world_size: int | None) -> None:
    """The model folder (config and weight files) and the placement against each other. world_size None
    (several nodes: torchrun decides) skips the rank-count check. Generates the embedded model if needed."""
    from moeplace.placement import load_placement
    from moeplace.runtime.checkpoint import Checkpoint
    from moeplace.runtime.model import check_placement
    from moeplace.runtime.tiny import default_model_dir

    if config.model is not None and not config.model.is_dir():
        raise ValueError(f"{config.model}: no such model folder")
    model_dir = config.model or default_model_dir()
    with Checkpoint(model_dir) as checkpoint:
        model_config = checkpoint.config
    if config.placement is None:
        return
    placement = load_placement(config.placement)
    check_placement(placement, model_config, world_size or placement.topology.num_gpus, str(model_dir))
    if config.gpus_per_node and placement.topology.gpus_per_node != config.gpus_per_node:
        raise ValueError(f"{config.placement}: placement has {placement.topology.gpus_per_node} GPUs per node, "
                         f"--gpus-per-node is {config.gpus_per_node}")


def run_ranks(config: ServeConfig, nproc: int, torchrun_args: list[str]) -> int:
    """Start the ranks, forward stop signals, wait for all of them; their exit status."""
    env = dict(os.environ, **{CONFIG_ENV: config.to_json()})
    env.pop("MOEPLACE_API_KEY", None)  # the ranks read the key from the config only
    if torchrun_args:
        procs = [subprocess.Popen(torchrun_command(nproc, torchrun_args), env=env, start_new_session=True)]
        return Ranks(procs).wait()
    store, listener = _loopback_store()  # both live until the ranks are gone
    port = listener.getsockname()[1]
    env.update({STORE_ENV: f"127.0.0.1:{port}", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)})
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, "-m", "moeplace.runtime.launch"], start_new_session=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]
    code = Ranks(procs).wait()
    del store, listener
    return code


def torchrun_command(nproc: int, torchrun_args: list[str]) -> list[str]:
    """Several nodes: torchrun with the user's rendezvous flags (--nnodes, --node-rank, --rdzv-endpoint ...)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *torchrun_args,
            "-m", "moeplace.runtime.launch"]


def _loopback_store():
    """A TCPStore served by this process on a socket bound to 127.0.0.1 (TCPStore would bind every interface)."""
    import torch.distributed as dist

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], None, is_master=True, wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    return store, listener


class Ranks:
    """The started processes: wait for them, stopping all when asked or when one fails."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs, self.stop_at, self.code = procs, None, 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _: self.stop(signum))

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.stop_at is not None:
            return
        self.stop_at = time.monotonic()
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM if signum == signal.SIGHUP else signum)

    def wait(self) -> int:
        while any(p.poll() is None for p in self.procs):
            for proc in self.procs:
                if proc.returncode not in (None, 0) and self.code == 0:
                    self.code = proc.returncode if proc.returncode > 0 else 128 - proc.returncode
                    self.stop()
            if self.stop_at is not None and time.monotonic() - self.stop_at > KILL_AFTER_S:
                for proc in self.procs:
                    _signal_group(proc, signal.SIGKILL)
            time.sleep(0.05)
        failed = [p.returncode for p in self.procs if p.returncode != 0]
        return self.code or (failed[0] if failed and failed[0] > 0 else 1 if failed else 0)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """The rank and anything it started (its own session: process group id = its pid)."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
