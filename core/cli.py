"""moeplace command line: a thin shell over the library (parse, call, print)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moeplace import __version__
from moeplace.fileio import check_output
from moeplace.placement import load_placement, save_placement
from moeplace.deployment import TopologyFlags, resolve_topology
from moeplace.placer.dispatch import DEFAULT_DISPATCH, Dispatch, TargetEngine, dispatch_model
from moeplace.placer.evaluate import evaluate as score_trace
from moeplace.placer.evaluate import moves
from moeplace.placer.export import FORMATS, export_notes, export_placement
from moeplace.placer.solve import Method, SolveOptions, solve as solve_placement
from moeplace.readers import load_trace
from moeplace.tables import moves_line, score_table, solve_table
from moeplace.trace import merge_traces

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Expert placement and load balancing for Mixture-of-Experts inference.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"moeplace {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Expert placement and load balancing for Mixture-of-Experts inference."""


def stdout() -> Console:
    """A console per command, so the width follows the terminal (and COLUMNS) at run time."""
    return Console()


@contextlib.contextmanager
def user_errors():
    """Bad input ends in one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except (ValueError, OSError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def solve(
    traces: Annotated[list[Path], typer.Argument(help="Trace files: moeplace .safetensors, SGLang .json/.pt, TensorRT-LLM folders.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Placement JSON to write.")],
    gpus: Annotated[Optional[int], typer.Option(help="GPUs (expert-parallel ranks); default: the served deployment's (--like, --from, or the trace's).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(help="GPUs per node; default: the served deployment's.")] = None,
    slots_per_gpu: Annotated[Optional[int], typer.Option(help="Expert slots per GPU.")] = None,
    redundant: Annotated[Optional[int], typer.Option(help="Redundant slots in all (instead of --slots-per-gpu).")] = None,
    like: Annotated[Optional[str], typer.Option(help="A running `moeplace serve`: plan for its topology.")] = None,
    trtllm_config: Annotated[Optional[Path], typer.Option(help="TensorRT-LLM load-balancer YAML: folds statistics of slot ids to experts.")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="MOEPLACE_API_KEY", help="--like: the server's API key.")] = None,
    engine: Annotated[TargetEngine, typer.Option(help="The engine the placement is for (sets the default --dispatch).")] = TargetEngine.moeplace,
    dispatch: Annotated[Optional[Dispatch], typer.Option(help="How the engine splits an expert over its replicas: equal, split (moeplace serve) or sglang-static.")] = None,
    from_: Annotated[Optional[Path], typer.Option("--from", help="Current placement: plan an incremental move from it.")] = None,
    time_limit: Annotated[float, typer.Option(help="Wall-clock seconds for the whole solve.")] = 20.0,
    traffic_weight: Annotated[float, typer.Option(help="Weight of cross-node traffic (share of routed tokens off their group's node).")] = 0.05,
    move_weight: Annotated[float, typer.Option(help="With --from: weight of moving every expert of a layer.")] = 0.05,
    method: Annotated[Method, typer.Option(help="cpsat (moeplace), greedy (its warm start) or eplb (DeepSeek EPLB).")] = Method.cpsat,
    memory_budget_gb: Annotated[Optional[float], typer.Option(help="GPU memory for expert slots, GB.")] = None,
    expert_bytes: Annotated[Optional[int], typer.Option(help="Bytes of one expert (default: the traced model's).")] = None,
    workers: Annotated[int, typer.Option(help="Processes solving layers in parallel (0 = CPU cores).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed of the search.")] = 0,
    per_layer: Annotated[bool, typer.Option(help="Print every layer, not only the summary.")] = True,
) -> None:
    """Compute an expert -> GPU placement with redundant replicas from expert-load traces."""
    with user_errors():
        loaded = [load_trace(t, trtllm_config=trtllm_config) for t in traces]
        flags = TopologyFlags(gpus=gpus, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu, redundant=redundant,
                              expert_bytes=expert_bytes,
                              gpu_memory_budget=None if memory_budget_gb is None else int(memory_budget_gb * 1e9))
        old = None if from_ is None else load_placement(from_)
        # the deployment to plan for: --like's live placement, else the one --from moves away from
        topology = resolve_topology(flags, loaded[0], _live_placement(like, api_key) if like else old)
        rule = dispatch or DEFAULT_DISPATCH[engine]
        options = SolveOptions(method=method, time_limit=time_limit, traffic_weight=traffic_weight,
                               move_weight=move_weight, dispatch=rule, seed=seed, workers=workers)
        check_output(output)
        with _progress() as progress:
            task = progress.add_task("solving layers", total=loaded[0].num_layers)
            result = solve_placement(loaded, topology, options, old, lambda _: progress.advance(task))
        save_placement(result.placement, output)
    stdout().print(solve_table(result, per_layer))
    if old is not None:
        stdout().print(moves_line(moves(old, result.placement)))
    stdout().print(f"wrote {output}")


def _live_placement(url: str, api_key: str | None):
    from moeplace.client import ServerClient

    return ServerClient(url, api_key).placement()


@app.command()
def evaluate(
    placement: Annotated[Path, typer.Argument(help="Placement JSON.")],
    traces: Annotated[list[Path], typer.Argument(help="Traces to score it on.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with per-layer numbers.")] = False,
    baseline: Annotated[Optional[Path], typer.Option(help="Another placement: experts/bytes to move from it.")] = None,
    engine: Annotated[TargetEngine, typer.Option(help="The engine that serves it (sets the default --dispatch).")] = TargetEngine.moeplace,
    dispatch: Annotated[Optional[Dispatch], typer.Option(help="How the engine splits an expert over its replicas: equal, split (moeplace serve) or sglang-static.")] = None,
    trtllm_config: Annotated[Optional[Path], typer.Option(help="TensorRT-LLM load-balancer YAML: folds statistics of slot ids to experts.")] = None,
) -> None:
    """Score a placement: per-layer imbalance under the engine's dispatch rule and with the best split,
    balancedness, remote nodes per token."""
    with user_errors():
        scored = load_placement(placement)
        model = dispatch_model(scored, dispatch or DEFAULT_DISPATCH[engine])
        scores = [score_trace(scored, load_trace(t, trtllm_config=trtllm_config), model) for t in traces]
        moved = None if baseline is None else moves(load_placement(baseline), scored)
    if as_json:
        out = {"placement": str(placement), "traces": [_score_json(s) for s in scores]}
        if moved is not None:
            out["moves"] = {"experts": moved.experts, "bytes": moved.bytes, "experts_per_layer": moved.experts_L.tolist()}
        typer.echo(json.dumps(out, indent=1))
        return
    topo = scored.topology
    stdout().print(score_table(scores, f"{placement}: {topo.num_gpus} GPUs, {topo.num_slots} slots"))
    if scored.duplicate_replicas():
        stdout().print(f"[yellow]{scored.duplicate_replicas()} replicas share a GPU with a copy of the same expert[/]")
    if moved is not None:
        stdout().print(moves_line(moved))


@app.command()
def export(
    placement: Annotated[Path, typer.Argument(help="Placement JSON.")],
    fmt: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(FORMATS)}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    num_model_layers: Annotated[Optional[int], typer.Option(help="Model layers (SGLang rows) if the placement lacks it.")] = None,
) -> None:
    """Write a placement in an engine's format (SGLang, TensorRT-LLM, DeepSeek EPLB; vLLM's is informational:
    vLLM cannot load a placement). For SGLang, prints the server flags that must match the file."""
    with user_errors():
        check_output(output)
        exported = load_placement(placement)
        export_placement(exported, fmt, output, num_model_layers=num_model_layers)
    stdout().print(f"wrote {output} ({fmt})")
    for line in export_notes(exported, fmt, output):
        stdout().print(line, highlight=False, soft_wrap=True)


@app.command()
def demo(
    offline: Annotated[bool, typer.Option(help="Only the solver on the embedded OLMoE trace (no server).")] = False,
    time_limit: Annotated[float, typer.Option(help="Seconds for each CP-SAT solve.")] = 5.0,
) -> None:
    """The whole loop on the embedded tiny model: serve (4 ranks), profile, solve, apply live, compare.
    With --offline: plan on five text domains of the OLMoE trace, score on the held-out sixth."""
    with user_errors():
        if offline:
            from moeplace.demo import run_demo

            run_demo(stdout(), time_limit)
            return
        from moeplace.live_demo import run_live_demo

        ok = run_live_demo(stdout(), solve_seconds=time_limit)
    raise typer.Exit(0 if ok else 1)


@app.command()
def report(
    traces: Annotated[list[Path], typer.Argument(help="Traces to show; several are shown as one, each a window.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML page to write (PNGs go beside it).")],
    placement: Annotated[Optional[Path], typer.Option(help="Placement to show against the trivial layout.")] = None,
) -> None:
    """Write a self-contained HTML report: expert load, per-GPU load before/after, replicas, nodes per token."""
    from moeplace.profiler.report import write_report

    with user_errors():
        check_output(output)
        shown = None if placement is None else load_placement(placement)
        loaded = [load_trace(t) for t in traces]
        written = write_report(loaded[0] if len(loaded) == 1 else merge_traces(loaded), output, shown)
    stdout().print(f"wrote {output} and {len(written) - 1} figure(s)")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _score_json(score) -> dict:
    out = score.summary()
    out["imbalance_per_layer"] = score.imbalance_L.round(5).tolist()
    out["best_split_per_layer"] = score.imbalance_best_L.round(5).tolist()
    return out


# serve, profile, apply, make-model: the commands that run or talk to an engine, registered on the `app`
# of the module moeplace.cli (under `python -m moeplace.cli` this file also runs as __main__, whose own
# `app` lacks them: the main block runs the module's)
from moeplace import cli_runtime  # noqa: E402

if __name__ == "__main__":
    cli_runtime.app()
