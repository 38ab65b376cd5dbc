"""Which implementation and tile runs a grouped FP8 GEMM: a table measured by `benchmarks/kernels.py`.

A GEMM is keyed by its kind (plain, or gate/up with the SwiGLU epilogue), the rows per expert rounded up
to a power of two (the bucket), and its N and K. The benchmark's sweep times every candidate per key on
the card and writes the table (`gemm_table.json` beside this file, one section per card name); the
dispatcher loads it once. A card, shape or bucket the table lacks falls back to `default_config`, a
hand-written Triton choice that runs anywhere, so a missing or foreign table is never an error.
Dimensions: M = sorted rows, E = experts, N = output features, K = reduction.
"""

import enum
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("gemm_table.json")
MAX_BUCKET = 8192  # rows per expert past this share the last bucket


class Backend(str, enum.Enum):
    triton = "triton"  # one program per (m-tile, n-tile), pointer loads: the decode shapes' kernel
    triton_tma = "triton_tma"  # persistent grid, TMA-fed tiles, optionally warp-specialised
    torch_loop = "torch_loop"  # torch._scaled_mm (cuBLAS, block scales) per expert: reads counts on the host
    # Hopper only (elsewhere the triton_tma kernel runs the same tile): persistent, a producer warp feeding
    # TMA loads, the block-scale promotion beside a later K block's wgmma (grouped_gemm_gluon.py)
    gluon = "gluon"


class GemmKind(str, enum.Enum):
    plain = "plain"  # c = a @ b.T per expert
    swiglu = "swiglu"  # gate/up with SiLU(gate)·up and FP8 requantisation


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 128
    group_m: int = 8  # m-tiles walked together, so neighbouring programs share A rows and B columns in L2
    num_warps: int = 4
    num_stages: int = 4
    backend: Backend = Backend.triton
    # triton_tma only: ask for Triton's automatic producer/consumer split (3.6 ignores it on sm_90 here:
    # its TTGIR keeps the loop attribute and makes no partitions). The gluon kernel always has its producer
    # warp (without one it ran 6-20% slower: benchmarks/BENCHMARKS.md, run 6)
    warp_specialize: bool = False
    prefetch_scales: bool = False  # Triton: load each K block's scales ahead of its promotion
    # triton_tma: persistent programs per SM. Triton 3.6 waits for each K block's wgmma before its scale
    # promotion; a second resident program can stream and multiply while the first waits (the overlap
    # DeepGEMM gets from two consumer warpgroups), where registers and shared memory let two fit. gluon:
    # consumer warpgroups per program, each with its own tiles and ring of slots, one producer warp for both
    programs_per_sm: int = 1
    # torch_loop only: CUDA streams the experts' GEMMs are spread over, so one GEMM's last partial wave of
    # tiles overlaps the next one's first (torch_gemm.stream_lanes)
    streams: int = 1
    # triton_tma only: K columns per pipeline stage, 128 (one scale block) or 64 (half of one: the
    # promotion then runs every 64 columns with the block's scales), so that a stage of the SwiGLU GEMM
    # (A and two weight tiles) takes 20 KB instead of 40 and two programs fit on an SM at 4-5 stages. Slower
    # than 128 at every shape measured on the H200 (run 5, benchmarks/BENCHMARKS.md): the wait and the
    # promotion come twice as often
    block_k: int = 128
    # gluon, 128-row tiles on 8 warps: two 4-warp consumer partitions take 64 of each tile's rows and share
    # its weight tile, each handing slots back on its own (no meeting of all 8 warps), and a half whose rows
    # all lie past the expert's end skips its wgmma (grouped_gemm_gluon.py)
    split_m: bool = False

    def __post_init__(self):
        object.__setattr__(self, "backend", Backend(self.backend))
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            assert v > 0 and v & (v - 1) == 0, f"GemmConfig.{name} must be a power of two, got {v}"
        assert 1 <= self.streams <= 8, f"GemmConfig.streams must be in [1, 8], got {self.streams}"
        assert 1 <= self.programs_per_sm <= 4, f"GemmConfig.programs_per_sm must be in [1, 4], got {self.programs_per_sm}"
        assert self.programs_per_sm == 1 or self.persistent, \
            f"GemmConfig.programs_per_sm={self.programs_per_sm} needs a persistent kernel (triton_tma, gluon)"
        assert self.block_k in (64, 128), f"GemmConfig.block_k must be 64 or 128, got {self.block_k}"
        assert self.block_k == 128 or self.backend is Backend.triton_tma, \
            f"GemmConfig.block_k={self.block_k} needs the persistent kernel (triton_tma)"
        if self.backend is Backend.gluon:  # a warpgroup's wgmma takes 64 rows; the promotion one scale block
            assert self.block_n == 128 and self.block_m in (64, 128) and self.num_warps * 16 >= self.block_m, \
                f"GemmConfig: the gluon kernel takes 64- or 128-row tiles of 128 columns on 4+ (128 rows: 8) " \
                f"warps, got m{self.block_m} n{self.block_n} w{self.num_warps}"
            # two consumers of 8 warps would need 2 x 256 threads x 192+ registers: more than an SM has
            assert self.programs_per_sm == 1 or self.num_warps == 4, \
                f"GemmConfig: two gluon consumers in a program take 4 warps each, got w{self.num_warps}"
        assert not self.split_m or (self.backend is Backend.gluon and self.block_m == 128 and self.num_warps == 8
                                    and self.programs_per_sm == 1), \
            f"GemmConfig.split_m: two 64-row halves of a gluon m128 w8 tile, one program an SM, got {self.label}"

    @property
    def persistent(self) -> bool:
        """Whether a fixed grid of programs walks the tiles (so programs_per_sm means something)."""
        return self.backend in (Backend.triton_tma, Backend.gluon)

    @property
    def label(self) -> str:
        if self.backend is Backend.torch_loop:
            return "torch _scaled_mm loop" + (f" {self.streams} streams" if self.streams > 1 else "")
        flags = " ws" * self.warp_specialize + " pf" * self.prefetch_scales
        flags += f" p{self.programs_per_sm}" if self.programs_per_sm > 1 else ""
        flags += f" k{self.block_k}" if self.block_k != 128 else ""
        flags += " split" * self.split_m
        return (f"{self.backend.value} m{self.block_m} n{self.block_n} g{self.group_m} w{self.num_warps} "
                f"s{self.num_stages}{flags}")


def gluon_takes(cfg: GemmConfig, swiglu: bool) -> bool:
    """Whether the gluon kernel's registers hold cfg's tile: an accumulator and two partials (plain), or two
    accumulators and four partials under SwiGLU, which therefore needs N split over two warpgroups (m64 on
    8 warps: 6 x 32 fp32 a thread); not in two halves (split_m: each 4-warp half would hold 128 columns of
    both)."""
    return not swiglu or (cfg.num_warps * 16 >= 2 * cfg.block_m and not cfg.split_m)


def fuses_swiglu(cfg: GemmConfig) -> bool:
    """Whether cfg's kernel applies SiLU(gate)·up and the FP8 quantisation in its epilogue. Otherwise the
    GEMM writes gate|up in bf16 and the SwiGLU kernel runs after it: the torch loop, and the gluon tiles
    whose registers cannot hold gate and up (gluon_takes)."""
    return cfg.backend is not Backend.torch_loop and (cfg.backend is not Backend.gluon or gluon_takes(cfg, True))


def gluon_runs(K: int) -> bool:
    """Whether the gluon kernel takes this K: an even number of 128-column scale blocks (its K loop takes
    them two at a time; DeepSeek-V3's 7168 and 2048 have 56 and 16)."""
    return K % 256 == 0


def gluon_warps(cfg: GemmConfig) -> int:
    """Warps of one gluon program: its consumers', and a warpgroup for the producer warp (partitions are
    given registers by the warpgroup; the PTX's .reqntid, checked by the compile test)."""
    return cfg.num_warps * cfg.programs_per_sm + 4


def default_config(rows_per_expert: float) -> GemmConfig:
    """Tiles from the H100 sweep in benchmarks/BENCHMARKS.md (each within ~2% of that shape's best)."""
    if rows_per_expert <= 16:  # decode over many experts: a few rows each, pure weight streaming
        return GemmConfig(block_m=16, block_n=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:  # decode at EP8
        return GemmConfig(block_m=64, block_n=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 256:  # prefill over many experts: ~1-2 m-tiles each
        return GemmConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=4)
    return GemmConfig(block_m=128, block_n=128, group_m=16, num_warps=8, num_stages=4)


def rows_bucket(rows_per_expert: float) -> int:
    """The power of two at or above the mean rows per expert, in [1, MAX_BUCKET]."""
    return min(MAX_BUCKET, 1 << max(0, math.ceil(math.log2(max(rows_per_expert, 1.0)))))


@dataclass(frozen=True, slots=True)
class TableEntry:
    """The sweep's winners for one key: `best` where the expert offsets are on the device only (the torch
    loop then pays a host sync, timed with it), `best_host` where the caller also holds them on the host,
    and the best Triton config (where the torch loop can't run, e.g. inside a CUDA graph capture)."""

    best: GemmConfig
    best_triton: GemmConfig
    best_host: GemmConfig


def load_table(path: Path, card: str) -> dict[tuple[str, int, int, int], TableEntry]:
    """{(kind, bucket, N, K): entry} for `card` from the JSON at `path`; {} if the file or card is absent."""
    if not path.is_file():
        return {}
    section = json.loads(path.read_text()).get("cards", {}).get(card, {})
    table = {}
    for row in section.get("entries", []):
        key = (GemmKind(row["kind"]).value, int(row["bucket"]), int(row["N"]), int(row["K"]))
        # tables written before best_host existed: the same choice with the offsets on the host
        best, best_host = GemmConfig(**row["best"]), GemmConfig(**row.get("best_host", row["best"]))
        table[key] = TableEntry(best, GemmConfig(**row["best_triton"]), best_host)
    return table


@lru_cache(maxsize=None)
def _cached_table(path: Path, card: str):
    return load_table(path, card)


def lookup(kind: GemmKind, rows_per_expert: float, N: int, K: int, card: str,
           path: Path = TABLE_PATH) -> TableEntry | None:
    """The measured entry for this GEMM on `card`: its own bucket, else the nearest measured bucket of the
    same kind, N and K (log distance); None if the table has no such shape."""
    table = _cached_table(path, card)
    same = [b for (k, b, n, kk) in table if (k, n, kk) == (kind.value, N, K)]
    if not same:
        return None
    want = rows_bucket(rows_per_expert)
    nearest = min(same, key=lambda b: (abs(math.log2(b) - math.log2(want)), b))
    return table[(kind.value, nearest, N, K)]


def table_row(kind: GemmKind, bucket: int, N: int, K: int, entry: TableEntry,
              timings_ms: dict[str, float]) -> dict:
    """One entry as the benchmark writes it (timings of every candidate kept for the record)."""
    as_dict = lambda c: {**asdict(c), "backend": c.backend.value}  # noqa: E731
    return dict(kind=kind.value, bucket=bucket, N=N, K=K, best=as_dict(entry.best),
                best_triton=as_dict(entry.best_triton), best_host=as_dict(entry.best_host), timings_ms=timings_ms)


def write_table(path: Path, card: str, entries: list[dict], meta: dict) -> None:
    """Write `entries` into `card`'s section of the table at `path`: they replace the entries of the same
    key, the card's other entries (shapes this run did not measure) and other cards' sections stay."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    key = lambda row: (row["kind"], row["bucket"], row["N"], row["K"])  # noqa: E731
    new = {key(row) for row in entries}
    kept = [row for row in doc.get("cards", {}).get(card, {}).get("entries", []) if key(row) not in new]
    doc.setdefault("cards", {})[card] = dict(meta, entries=sorted(kept + entries, key=key))
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    _cached_table.cache_clear()
