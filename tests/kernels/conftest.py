"""Kernel tests: Triton kernels against their plain-torch references.

On a machine without CUDA the kernels run in Triton's interpreter on CPU (small shapes); on the GPU
machine the same tests compile for the card, and the `gpu` ones add full DeepSeek shapes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton picks interpreter or compiler when a kernel is decorated, so this must precede importing
# moeplace.kernels anywhere in the session (conftest files load before the test modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeplace.kernels._triton import HAS_TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "sglang-dsv3-ep-statistics"


def pytest_configure(config):
    config.addinivalue_line("markers", "ref_only: runs the plain-torch references only (no Triton needed)")


@pytest.fixture(autouse=True)
def _requirements(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not HAS_TRITON and not request.node.get_closest_marker("ref_only"):
        pytest.skip("Triton is not installed: pip install -e '.[dev,kernels]' to run the kernel tests")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh inputs on every run: seeded from the OS, the seed printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def dsv3_counts() -> np.ndarray:
    """[workloads * 58, 256] real DeepSeek-V3 per-layer expert counts (MoE layers 3..60 of every file), or the
    rows of the derived file that MOEPLACE_DSV3_COUNTS names."""
    files = sorted(TRACES.glob("*.json"))
    if files:
        return np.concatenate([np.asarray(json.loads(f.read_text())["logical_count"])[3:61] for f in files])
    # The device machine has no ../shared: benchmarks/kernels.py --write-counts derives a few layers' counts
    derived = Path(os.environ.get("MOEPLACE_DSV3_COUNTS", "/nonexistent"))
    if derived.is_file():
        return np.asarray(list(json.loads(derived.read_text()).values()))
    pytest.skip(f"DeepSeek-V3 statistics not found at {TRACES} (the ../shared traces are not checked out) "
                "and MOEPLACE_DSV3_COUNTS names no derived counts file")


@pytest.fixture
def routing(dsv3_counts, gen):
    """sample(T, K, E, local=E) → (topk_ids_TK int32, topk_weights_TK float32) on DEVICE.

    Experts' popularity is a real DeepSeek-V3 layer (a random row, a random subset of its 256 experts),
    with an eighth of the experts never chosen so that empty experts always occur; ids ≥ `local` become
    -1, as on an EP rank that holds experts [0, local)."""

    def sample(T: int, K: int, E: int, local: int | None = None):
        row = dsv3_counts[torch.randint(len(dsv3_counts), (1,), generator=gen).item()]
        pick = torch.randperm(row.size, generator=gen)[:E] if E <= row.size else torch.randint(row.size, (E,), generator=gen)
        p = torch.as_tensor(row[pick.numpy()], dtype=torch.float64)
        p[torch.randperm(E, generator=gen)[: max(E // 8, 1)]] = 0.0
        assert (p > 0).sum() >= K, f"too few experts left ({(p > 0).sum()}) for top-{K}"
        ids = torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen).to(torch.int32)
        if local is not None:
            ids[ids >= local] = -1
        w = torch.rand(T, K, generator=gen) + 0.1
        w = 2.5 * w / w.sum(dim=1, keepdim=True)  # renormalised × routed_scaling_factor, as DeepSeek-V3
        return ids.to(DEVICE), w.to(DEVICE)

    return sample


def _poisoned_empty(real_empty):
    def empty(*size, dtype=None, device=None, **kw):
        t = real_empty(*size, dtype=dtype, device=device, **kw)
        if t.is_floating_point():
            t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan"))  # 0x7F: e4m3 NaN
        else:
            t.fill_(-0x5A5A5A5A if t.dtype in (torch.int32, torch.int64) else 0x5A)
        return t

    return empty


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty during the test comes back filled with NaN (ints: a wild value), so an
    element the kernel forgot to write fails the comparison instead of passing as leftover memory."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))


@pytest.fixture
def gemm_tol() -> float:
    """‖c − ref‖ / ‖ref‖ allowed for an FP8 GEMM against its float64 reference on the same FP8 inputs.
    The products are exact and the interpreter sums them in fp32, but Hopper's FP8 tensor cores keep only
    about 14 fraction bits while summing inside one 128-wide K block (the DeepSeek-V3 report's FP8
    accumulation note; 1.3e-4 seen on an H100); promoting to fp32 every block stops it growing with K."""
    return 5e-4 if DEVICE == "cuda" else 1e-5


@pytest.fixture
def rel_err():
    """‖out − ref‖ / ‖ref‖ in float64; a NaN anywhere gives NaN, which fails every `<` check."""

    def err(out: torch.Tensor, ref: torch.Tensor) -> float:
        out, ref = out.double().cpu(), ref.double().cpu()
        return ((out - ref).norm() / ref.norm()).item()

    return err
