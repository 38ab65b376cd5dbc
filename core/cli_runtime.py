"""moeplace commands that run an engine or talk to a running one: serve, profile, apply, make-model.
Registered on the one `app` of moeplace.cli, which imports this module last."""

from __future__ import annotations

import enum
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from moeplace.cli import _progress, app, stdout, user_errors
from moeplace.fileio import check_output
from moeplace.placement import load_placement
from moeplace.placer.dispatch import TargetEngine
from moeplace.placer.export import restart_instructions
from moeplace.trace import save_trace

@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    nproc: Annotated[int, typer.Option(help="Ranks (GPUs) on this node.")] = 1,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node (0: all ranks on one node).")] = 0,
    model: Annotated[Optional[Path], typer.Option(help="DeepSeek-V3-family checkpoint folder (default: the embedded tiny model).")] = None,
    placement: Annotated[Optional[Path], typer.Option(help="Placement JSON to serve with (default: trivial).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless an API key is given).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of rank 0.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu (gloo) or cuda (NCCL).")] = "cpu",
    api_key: Annotated[Optional[str], typer.Option(envvar="MOEPLACE_API_KEY", show_envvar=True, help="Required to bind off loopback; prefer the environment variable or --api-key-file (a command line is visible in ps).")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File whose first line is the API key.")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences each rank serves at once.")] = 8,
    queue_limit: Annotated[int, typer.Option(help="Requests that may wait; more get 503 with Retry-After.")] = 64,
    log_level: Annotated[str, typer.Option(help="critical, error, warning or info (info: one access-log line per request).")] = "warning",
    read_timeout: Annotated[float, typer.Option(help="Seconds a client has to send a whole request; slower connections are closed.")] = 10.0,
) -> None:
    """Serve a DeepSeek-V3-family FP8 model with expert parallelism over `--nproc` ranks.
    Extra arguments go to torchrun, which then starts the ranks (several nodes: --nnodes, --node-rank,
    --rdzv-endpoint ...). SIGTERM or Ctrl-C stops every rank within 10 s."""
    from moeplace.runtime.launch import ServeConfig
    from moeplace.runtime.supervise import preflight, run_ranks

    with user_errors():
        key = _read_key(api_key_file) if api_key_file is not None else api_key
        config = ServeConfig(model=model, placement=placement, host=host, port=port, device=device,
                             gpus_per_node=gpus_per_node, api_key=key or None, max_batch=max_batch,
                             queue_limit=queue_limit, log_level=log_level, read_timeout=read_timeout)
        preflight(config, nproc, list(ctx.args))
    code = run_ranks(config, nproc, list(ctx.args))
    # Skip the interpreter's teardown of torch (seconds on a loaded machine): the ranks are gone, and
    # a process manager expects the whole server to end within its stop timeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _read_key(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the API key ({exc.__class__.__name__})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: the first line (the API key) is empty")
    return lines[0].strip()


class EngineKind(str, enum.Enum):
    """What serves at `profile --url` (not the runtime's `Engine` class)."""

    moeplace = "moeplace"
    sglang = "sglang"
    vllm = "vllm"


@app.command()
def profile(
    output: Annotated[Path, typer.Option("-o", "--output", help="Trace file to write (.safetensors).")],
    url: Annotated[Optional[str], typer.Option(help="A running engine's HTTP address.")] = None,
    engine: Annotated[EngineKind, typer.Option(help="What runs at --url.")] = EngineKind.moeplace,
    duration: Annotated[float, typer.Option(help="Seconds to record.")] = 10.0,
    window_seconds: Annotated[float, typer.Option(help="moeplace: length of one recorded window.")] = 1.0,
    dump_dir: Annotated[Optional[Path], typer.Option(help="sglang: the server's dump folder, seen from here.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="sglang: experts per token, for count dumps of non-DeepSeek models.")] = None,
    hf_model: Annotated[Optional[Path], typer.Option(help="A local Hugging Face MoE model folder to run offline.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="--hf-model, vllm: prompt file (one per line, JSON or JSONL).")] = None,
    max_tokens: Annotated[int, typer.Option(help="--hf-model, vllm: tokens to generate after each prompt.")] = 0,
    num_experts: Annotated[Optional[int], typer.Option(help="vllm: the model's routed experts (default: DeepSeek-V3's 256).")] = None,
    sample_rate: Annotated[float, typer.Option(help="Share of tokens whose top-k ids are kept (co-activation).")] = 0.0,
    device: Annotated[str, typer.Option(help="--hf-model: cpu or cuda.")] = "cpu",
    api_key: Annotated[Optional[str], typer.Option(envvar="MOEPLACE_API_KEY", help="The server's API key.")] = None,
    admin_api_key: Annotated[Optional[str], typer.Option(envvar="SGLANG_ADMIN_API_KEY", help="sglang: its --admin-api-key (the recorder wants it).")] = None,
) -> None:
    """Record per-layer expert load: from a running moeplace or SGLang server (--url), from a vLLM server's
    routed experts on a prompt file (--engine vllm --prompts), or by running a Hugging Face MoE model
    on a prompt file (--hf-model, --prompts)."""
    with user_errors():
        check_output(output)
        if (url is None) == (hf_model is None):
            raise ValueError("give exactly one of --url (a running engine) and --hf-model (an offline model)")
        if hf_model is None and duration <= 0:
            raise ValueError(f"--duration must be positive, got {duration}")
        keys = _Keys(api_key, admin_api_key)
        trace = _record(url, engine, duration, window_seconds, dump_dir, top_k, hf_model, prompts,
                        max_tokens, sample_rate, device, keys, num_experts)
        save_trace(trace, output)
    if "warnings" in trace.metadata:
        Console(stderr=True).print(f"[yellow]warning:[/] {escape(trace.metadata['warnings'])}", highlight=False)
    stdout().print(f"wrote {output}: {trace.num_windows} windows x {trace.num_layers} layers x "
                   f"{trace.num_experts} experts" + ("" if trace.tokens_W is None else f", {int(trace.tokens_W.sum())} tokens"))


@dataclass(frozen=True)
class _Keys:
    api_key: str | None
    admin_api_key: str | None


def _record(url, engine, duration, window_seconds, dump_dir, top_k, hf_model, prompts, max_tokens,
            sample_rate, device, keys: _Keys, num_experts):
    if hf_model is not None:
        from transformers.utils import logging as hf_logging

        from moeplace.profiler.hf import profile_hf_model
        from moeplace.profiler.prompts import read_prompt_file

        hf_logging.disable_progress_bar()  # one progress bar: ours
        if prompts is None:
            raise ValueError("--hf-model needs --prompts FILE")
        texts = read_prompt_file(prompts)
        with _progress() as progress:
            task = progress.add_task("profiling", total=None)
            return profile_hf_model(hf_model, texts, max_tokens=max_tokens, device=device, sample_rate=sample_rate,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
    if engine is EngineKind.sglang:
        from moeplace.profiler.sglang import record_sglang

        return record_sglang(url, duration, dump_dir=dump_dir, api_key=keys.api_key,
                             admin_api_key=keys.admin_api_key, top_k=top_k)
    if engine is EngineKind.vllm:
        from moeplace.profiler.prompts import read_prompt_file
        from moeplace.profiler.vllm import profile_vllm

        if prompts is None:
            raise ValueError("--engine vllm needs --prompts FILE (vLLM returns the routing of the requests we send)")
        texts = read_prompt_file(prompts)
        with _progress() as progress:
            task = progress.add_task("prompts", total=len(texts))
            return profile_vllm(url, texts, max_tokens=max_tokens or 16, api_key=keys.api_key, num_experts=num_experts,
                                progress=lambda done, total: progress.update(task, completed=done))
    from moeplace.client import ServerClient

    with tempfile.TemporaryDirectory() as tmp:
        return ServerClient(url, keys.api_key).profile(duration, window_seconds, Path(tmp) / "dump.safetensors",
                                                       sample_rate)


@app.command()
def apply(
    placement: Annotated[Path, typer.Argument(help="Placement JSON to make live.")],
    url: Annotated[Optional[str], typer.Option(help="A running `moeplace serve`.")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="MOEPLACE_API_KEY", help="The server's API key.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reshard.")] = 3600.0,
    engine: Annotated[TargetEngine, typer.Option(help="What serves: moeplace reshards live; SGLang needs a restart.")] = TargetEngine.moeplace,
) -> None:
    """Reshard a running server to PLACEMENT while it keeps serving; exit 0 only when it is live.
    --engine sglang: SGLang cannot take a placement while running; prints the restart command instead."""
    from moeplace.client import ServerClient
    from moeplace.reshard_job import JobState

    if engine is not TargetEngine.moeplace:
        with user_errors():
            lines = restart_instructions(load_placement(placement), placement, engine)
        for line in lines:
            stdout().print(line, highlight=False, soft_wrap=True)
        raise typer.Exit(1)  # nothing was applied
    with user_errors():
        if url is None:
            raise ValueError("give --url: the running `moeplace serve` to reshard")
        target = load_placement(placement)
        client = ServerClient(url, api_key)
        job = client.submit(target)
        with _progress() as progress:
            task = progress.add_task(f"reshard {job.id}", total=job.layers_total)
            status = client.wait(job.id, lambda s: progress.update(task, completed=s.layers_done), timeout)
        if status.state is not JobState.DONE:
            raise ValueError(f"{url}: reshard {status.id} {status.state.value}: {status.error}")
        if not np.array_equal(client.placement().phy2log_LP, target.phy2log_LP):
            raise ValueError(f"{url}: reshard reported done but the live placement differs from {placement}")
    stdout().print(f"live: {status.experts_moved} experts moved ({status.bytes_moved / 1e6:.1f} MB) "
                   f"in {status.seconds:.3f} s, {status.bandwidth_gbps:.3f} GB/s")
    spent = lambda phases: ", ".join(f"{name} {seconds:.3f} s" for name, seconds in asdict(phases).items())  # noqa: E731
    stdout().print(f"time: {spent(status.phase_seconds)}")
    for rank, phases in enumerate(status.rank_phase_seconds):
        stdout().print(f"time on rank {rank}: {spent(phases)}")


@app.command("make-model")
def make_model(
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to create (must not exist).")],
    preset: Annotated[str, typer.Option(help="deepseek-v3 (DeepSeek-V3 shapes) or small (hidden 256, for CPU).")] = "deepseek-v3",
    moe_layers: Annotated[int, typer.Option(help="MoE layers after the one dense layer.")] = 4,
    routing_trace: Annotated[Optional[Path], typer.Option(help="Trace whose per-layer expert popularity the routers follow (256 experts; default: DeepSeek-V3 decode statistics in ../shared).")] = None,
    trace_layer: Annotated[Optional[list[int]], typer.Option(help="Trace layer id to follow, once per MoE layer in order (default: evenly spaced).")] = None,
    device: Annotated[str, typer.Option(help="Where tensors are drawn and the routers fitted: cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Generate a DeepSeek-V3-architecture FP8 checkpoint with random weights, in the Hugging Face layout,
    whose router biases make each MoE layer's expert popularity follow a layer of a routing trace."""
    from moeplace.runtime.synthetic import SyntheticSpec, make_model as make

    log = Console(stderr=True)
    with user_errors():
        spec = SyntheticSpec(preset, moe_layers, seed, device)
        report = make(output, spec, routing_trace, trace_layer, lambda line: log.print(escape(line), highlight=False))
    fit = report["popularity"]
    for i, layer in enumerate(report["model_layers"]):
        stdout().print(f"layer {layer} <- trace layer {report['trace_layers'][i]}: correlation / total variation "
                       f"fit {fit['fit']['corr'][i]:.3f} / {fit['fit']['tvd'][i]:.3f}, held-out "
                       f"{fit['held_out']['corr'][i]:.3f} / {fit['held_out']['tvd'][i]:.3f} "
                       f"(uniform: {fit['uniform_tvd'][i]:.3f})", highlight=False)
    stdout().print(f"wrote {output}")
