"""Convert per-token routing logs (JSON lines) into a moeplace trace, with moeplace's Python API.

Input: one JSON object per (token, MoE layer), as an engine patched to log its routers writes them
(for example the Mixtral-8x7B vLLM logs of the speculative-moe project):

    {"problem_id": 3, "token_idx": 17, "layer": 0, "experts": [7, 0], ...}

Output: a `.safetensors` trace with one window per value of `--window-key` (a problem, a request),
counts per window x layer x expert, and every token's top-k ids as the per-token sample (co-activation
for the solver's traffic term). Then `moeplace solve/evaluate/report` take it like any trace.

    python examples/routing_jsonl_to_trace.py LOG.jsonl --experts 8 -o trace.safetensors
    python examples/routing_jsonl_to_trace.py --example -o trace.safetensors  # a generated log, converted
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from moeplace import Trace, save_trace


def read_log(path: Path, num_experts: int, window_key: str) -> Trace:
    """The trace of a JSON-lines routing log; ValueError naming the line for anything malformed."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            r = json.loads(line)
            if not isinstance(r.get("experts"), list) or "layer" not in r or "token_idx" not in r:
                raise ValueError(f"{path}:{n}: needs 'layer', 'token_idx' and an 'experts' list")
            records.append((str(r.get(window_key, "all")), int(r["token_idx"]), int(r["layer"]), r["experts"]))
    windows = sorted({w for w, *_ in records})
    layers = sorted({layer for _, _, layer, _ in records})
    tokens = sorted({(w, t) for w, t, *_ in records})
    top_k = len(records[0][3])
    counts_WLE = np.zeros((len(windows), len(layers), num_experts))
    ids_TLK = np.full((len(tokens), len(layers), top_k), -1)  # -1: this token was not logged at that layer
    w_of, l_of, t_of = ({v: i for i, v in enumerate(xs)} for xs in (windows, layers, tokens))
    for w, t, layer, experts in records:
        np.add.at(counts_WLE[w_of[w], l_of[layer]], experts, 1)
        ids_TLK[t_of[(w, t)], l_of[layer]] = experts
    return Trace(counts_WLE=counts_WLE, layers=np.array(layers), top_k=top_k, topk_ids_TLK=ids_TLK,
                 metadata={"engine": "jsonl log", "window_names": json.dumps(windows)}, source=str(path))


def example_log(path: Path, num_experts: int = 8, layers: int = 4, windows: int = 3, tokens: int = 40) -> None:
    """Write a log in the input format: top-2 routing with a few popular experts per layer."""
    rng = np.random.default_rng(0)
    lines = []
    for layer in range(layers):
        popularity = rng.dirichlet(np.full(num_experts, 0.7))
        for w in range(windows):
            for t in range(tokens):
                experts = rng.choice(num_experts, size=2, replace=False, p=popularity).tolist()
                lines.append(json.dumps({"problem_id": w, "token_idx": t, "layer": layer, "experts": experts}))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", nargs="?", type=Path, help="JSON-lines routing log")
    parser.add_argument("--example", action="store_true", help="convert a generated example log")
    parser.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    parser.add_argument("--window-key", default="problem_id", help="record field that names a window")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.example == (args.log is not None):
        parser.error("give a LOG file or --example")
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or Path(tmp) / "example_routing.jsonl"
        if args.example:
            example_log(log, args.experts)
        trace = read_log(log, args.experts, args.window_key)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {trace.num_windows} windows x {trace.num_layers} layers x {trace.num_experts} "
          f"experts, top-{trace.top_k}, {len(trace.topk_ids_TLK)} tokens sampled")
    print(f"next: moeplace solve {args.output} --gpus 4 --gpus-per-node 2 --slots-per-gpu 3 -o placement.json")


if __name__ == "__main__":
    main()
