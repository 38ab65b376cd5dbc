"""Build `core/data/olmoe_routing.safetensors`, moeplace's embedded default trace.

Converts the OLMoE paper's routing counts (allenai/OLMoE, Apache-2.0; see olmoe_routing.README.md)
from ../shared/traces/olmoe-mixtral-routing-analysis/olmoe_routing_counts.npz into a moeplace trace:
one window per text domain, the three layers the paper saved (0, 7, 15) of OLMoE-1B-7B's 16, 64
experts, top-8.

    python examples/make_olmoe_trace.py [--source NPZ] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moeplace.trace import Trace, save_trace

DOMAINS = ["arxiv", "book", "c4", "github", "wikipedia", "tulu"]
LAYERS = [0, 7, 15]
TOP_K = 8
SOURCE_REPO = "allenai/OLMoE"
SOURCE_COMMIT = "357454f4f647385839c0ff6b99a688dc7cd9c13f"
DEFAULT_SOURCE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "olmoe-mixtral-routing-analysis"
    / "olmoe_routing_counts.npz"
)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "core" / "data" / "olmoe_routing.safetensors"


def build_trace(npz_path: Path) -> Trace:
    """counts_WLE [6 domains, 3 layers, 64 experts] from the `expert_counts__<domain>` arrays."""
    with np.load(npz_path) as npz:  # allow_pickle stays False: the file holds plain arrays
        counts_WLE = np.stack([npz[f"expert_counts__{domain}"] for domain in DOMAINS]).astype(np.float64)
    # Each token adds one count to each of its 8 experts, so a layer row sums to tokens x 8.
    tokens_W = counts_WLE[:, 0, :].sum(axis=1) / TOP_K
    return Trace(
        counts_WLE=counts_WLE,
        layers=np.array(LAYERS, dtype=np.int64),
        top_k=TOP_K,
        tokens_W=tokens_W,
        num_model_layers=16,
        metadata={
            "model": "allenai/OLMoE-1B-7B-0924",
            "engine": "transformers (offline)",
            "window_names": json.dumps(DOMAINS),
            "source": npz_path.name,
            "source_repo": SOURCE_REPO,
            "source_commit": SOURCE_COMMIT,
            "source_path": "scripts/routing_output/olmoe/expert_counts*/*.pkl",
            "licence": "Apache-2.0",
            "attribution": (
                "Routing counts from the OLMoE paper's routing analysis (arXiv 2409.02060), "
                f"github.com/{SOURCE_REPO} at commit {SOURCE_COMMIT}, Apache-2.0; converted by moeplace."
            ),
            "notes": "Only layers 0, 7 and 15 were saved by the source; one window per text domain.",
        },
        source=str(npz_path),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="olmoe_routing_counts.npz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="trace file to write")
    args = parser.parse_args(argv)
    trace = build_trace(args.source)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {trace.num_windows} windows x {trace.num_layers} layers x {trace.num_experts} experts")


if __name__ == "__main__":
    main()
