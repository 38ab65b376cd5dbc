"""Entry point of one rank under torchrun (`moeplace serve` builds the torchrun command).

    python -m torch.distributed.run --nproc-per-node P ... -m moeplace.runtime.launch --port 8000 ...

Rank 0 serves HTTP and schedules; the other ranks follow its broadcast steps.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(slots=True)
class ServeConfig:
    model: Path | None
    placement: Path | None
    host: str
    port: int
    device: str
    gpus_per_node: int
    api_key: str | None
    max_batch: int
    queue_limit: int = 64  # requests waiting beyond max_batch; more are answered 503 with Retry-After

    def __post_init__(self) -> None:
        if self.queue_limit < 1:
            raise ValueError(f"--queue-limit must be >= 1, got {self.queue_limit}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"binding to {self.host} (not loopback) requires --api-key")
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"{self.model}: not a model folder (no config.json)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="moeplace.runtime.launch")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--placement", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 = every rank on one node")
    p.add_argument("--api-key", default=os.environ.get("MOEPLACE_API_KEY"))
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--queue-limit", type=int, default=64, help="waiting requests before 503 + Retry-After")
    a = p.parse_args(argv)
    return ServeConfig(a.model, a.placement, a.host, a.port, a.device, a.gpus_per_node, a.api_key, a.max_batch,
                       a.queue_limit)


def torchrun_command(config: ServeConfig, nproc: int, torchrun_args: list[str]) -> list[str]:
    """The command `moeplace serve` runs: torchrun with `nproc` ranks on this node, then this module.
    Multi-node deployments pass torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint ...)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if config.gpus_per_node and nproc % config.gpus_per_node and not torchrun_args:
        raise ValueError(f"--nproc {nproc} is not a multiple of --gpus-per-node {config.gpus_per_node}")
    rendezvous = [] if torchrun_args else ["--standalone"]
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rendezvous, *torchrun_args,
            "-m", "moeplace.runtime.launch", "--host", config.host, "--port", str(config.port),
            "--device", config.device, "--gpus-per-node", str(config.gpus_per_node), "--max-batch", str(config.max_batch),
            "--queue-limit", str(config.queue_limit)]
    if config.model is not None:
        args += ["--model", str(config.model)]
    if config.placement is not None:
        args += ["--placement", str(config.placement)]
    return args


def preflight(config: ServeConfig, world_size: int | None) -> None:
    """Check the model folder and the placement against each other before any rank starts, so a bad
    input is one line from `moeplace serve` instead of an error in every rank. world_size None
    (multi-node: torchrun decides) skips the rank-count check. Generates the embedded model if needed."""
    from moeplace.placement import load_placement
    from moeplace.runtime.config import ModelConfig
    from moeplace.runtime.model import check_placement
    from moeplace.runtime.tiny import default_model_dir

    model_dir = config.model or default_model_dir()
    model_config = ModelConfig.load(model_dir)
    if config.placement is None:
        return
    placement = load_placement(config.placement)
    check_placement(placement, model_config, world_size or placement.topology.num_gpus, str(model_dir))
    if config.gpus_per_node and placement.topology.gpus_per_node != config.gpus_per_node:
        raise ValueError(f"{config.placement}: placement has {placement.topology.gpus_per_node} GPUs per node, "
                         f"--gpus-per-node is {config.gpus_per_node}")


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Control messages (the batch of each step) travel on gloo whatever the data backend; a live
    # reshard moves weights on a group of its own so its transfers never queue behind a step's.
    control = dist.new_group(backend="gloo")
    reshard_group = dist.new_group(backend="gloo" if device.type == "cpu" else "nccl")
    try:
        try:
            model, tokenizer = load_model(config, world, device)
        except ValueError as exc:  # raised on every rank (the load is collective): one line, from rank 0
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        from moeplace.runtime.reshard import Resharder

        # On GPUs the reshard's agreements and handshakes go on gloo: a rank waiting there waits on the host.
        reshard_control = dist.new_group(backend="gloo") if device.type == "cuda" else None
        resharder = Resharder(model, reshard_group, rank, control=reshard_control)
        resharder.connect()
        if rank == 0:
            serve(config, model, tokenizer, control, resharder)
        else:
            from moeplace.runtime.ranks import worker_loop

            worker_loop(model, control, engine_config(config), resharder)
    finally:
        dist.destroy_process_group()


def load_model(config: ServeConfig, world: int, device: torch.device):
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


def serve(config: ServeConfig, model, tokenizer, control, resharder) -> None:
    import uvicorn

    from moeplace.runtime.engine import Engine
    from moeplace.runtime.server import create_app

    engine = Engine(model, engine_config(config), control, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    resharder=resharder)
    app = create_app(engine, model, tokenizer, model_name=str(config.model or "moeplace-tiny-dsv3"),
                     api_key=config.api_key, resharder=resharder)
    loop = threading.Thread(target=engine.run, name="engine", daemon=True)
    loop.start()
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.stop()
        loop.join()


if __name__ == "__main__":
    main()
