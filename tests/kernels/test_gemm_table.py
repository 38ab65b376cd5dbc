"""The measured dispatch table: written by the benchmark's sweep, read by the dispatcher, safe when absent."""

import json

import pytest
import torch

from moeplace.kernels.gemm_table import (Backend, GemmConfig, GemmKind, TableEntry, default_config, load_table,
                                         lookup, rows_bucket, table_row, write_table)
from moeplace.kernels.grouped_gemm import choose_config

pytestmark = pytest.mark.ref_only


def test_rows_bucket_rounds_up_to_powers_of_two():
    assert [rows_bucket(r) for r in (0.2, 1, 3, 4, 4.5, 1000, 1e9)] == [1, 1, 4, 4, 8, 1024, 8192]


def test_table_round_trip_nearest_bucket_and_other_cards(tmp_path):
    path = tmp_path / "t.json"
    loop, tma = GemmConfig(backend=Backend.torch_loop), GemmConfig(128, 128, 8, 8, 4, backend="triton_tma")
    loop3 = GemmConfig(backend=Backend.torch_loop, streams=3)
    rows = [table_row(GemmKind.plain, 1024, 4096, 7168, TableEntry(loop, tma, loop3), {"x": 1.0}),
            table_row(GemmKind.plain, 32, 4096, 7168, TableEntry(tma, tma, tma), {})]
    write_table(path, "H200", rows, {"date": "d"})
    write_table(path, "H100", [table_row(GemmKind.swiglu, 8, 256, 128, TableEntry(tma, tma, tma), {})], {})
    assert set(json.loads(path.read_text())["cards"]) == {"H200", "H100"}, "a card's section replaces only its own"
    entry = lookup(GemmKind.plain, 700.0, 4096, 7168, "H200", path)
    assert entry == TableEntry(loop, tma, loop3)
    assert lookup(GemmKind.plain, 40.0, 4096, 7168, "H200", path).best == tma, "nearest measured bucket"
    assert lookup(GemmKind.swiglu, 700.0, 4096, 7168, "H200", path) is None, "another kind is another key"
    assert lookup(GemmKind.plain, 700.0, 4096, 7168, "A100", path) is None, "a card the sweep never saw"
    assert load_table(tmp_path / "missing.json", "H200") == {}


def test_a_partial_sweep_replaces_only_its_own_keys_and_old_rows_still_load(tmp_path):
    path = tmp_path / "t.json"
    loop, tma = GemmConfig(backend=Backend.torch_loop), GemmConfig(128, 128, 8, 8, 4, backend="triton_tma")
    old = table_row(GemmKind.plain, 4, 4096, 7168, TableEntry(tma, tma, tma), {})
    del old["best_host"]  # written before the host-offsets winner existed
    key = (GemmKind.plain, 1024, 4096, 7168)
    write_table(path, "H200", [old, table_row(*key, TableEntry(tma, tma, tma), {})], {})
    write_table(path, "H200", [table_row(*key, TableEntry(loop, tma, loop), {})], {})
    assert lookup(GemmKind.plain, 4, 4096, 7168, "H200", path) == TableEntry(tma, tma, tma), "kept; best_host = best"
    assert lookup(GemmKind.plain, 1024, 4096, 7168, "H200", path).best == loop, "replaced by the new sweep"
    assert len(json.loads(path.read_text())["cards"]["H200"]["entries"]) == 2


def test_config_rejects_a_tile_that_is_not_a_power_of_two():
    with pytest.raises(AssertionError, match="GemmConfig.block_m must be a power of two, got 96"):
        GemmConfig(block_m=96)
    with pytest.raises(ValueError, match="'cutlass' is not a valid Backend"):
        GemmConfig(backend="cutlass")
    with pytest.raises(AssertionError, match="GemmConfig.streams must be in \\[1, 8\\], got 0"):
        GemmConfig(backend="torch_loop", streams=0)
    with pytest.raises(AssertionError, match="programs_per_sm=2 needs a persistent kernel"):
        GemmConfig(programs_per_sm=2)
    with pytest.raises(AssertionError, match="programs_per_sm must be in \\[1, 4\\], got 5"):
        GemmConfig(backend="triton_tma", programs_per_sm=5)
    with pytest.raises(AssertionError, match="block_k must be 64 or 128, got 32"):
        GemmConfig(backend="triton_tma", block_k=32)
    with pytest.raises(AssertionError, match="block_k=64 needs the persistent kernel"):
        GemmConfig(block_k=64)


def test_programs_per_sm_and_block_k_survive_the_table_and_show_in_the_label(tmp_path):
    path, p2 = tmp_path / "t.json", GemmConfig(64, 128, 1, 4, 3, backend="triton_tma", programs_per_sm=2, block_k=64)
    write_table(path, "H200", [table_row(GemmKind.plain, 32, 7168, 2048, TableEntry(p2, p2, p2), {})], {})
    assert lookup(GemmKind.plain, 32, 7168, 2048, "H200", path).best == p2
    assert p2.label == "triton_tma m64 n128 g1 w4 s3 p2 k64"
    assert " p" not in GemmConfig().label and " k" not in GemmConfig().label


def test_off_the_gpu_the_dispatch_is_the_default():
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, torch.device("cpu")) == default_config(1024)


def test_the_committed_table_covers_the_benchmark_shapes():
    """kernels/gemm_table.json as the benchmark's sweep wrote it on an H200: every shape and kind there."""
    from moeplace.kernels.gemm_table import TABLE_PATH
    table = load_table(TABLE_PATH, "NVIDIA H200")
    for kind, N, K in ((GemmKind.plain, 4096, 7168), (GemmKind.plain, 7168, 2048), (GemmKind.swiglu, 4096, 7168)):
        for rows in (4, 32, 128, 1024):  # decode E256, decode E32, prefill E256, prefill E32
            entry = lookup(kind, rows, N, K, "NVIDIA H200", TABLE_PATH)
            assert (kind.value, rows_bucket(rows), N, K) in table
            assert entry.best_triton.backend is not Backend.torch_loop


def test_the_torch_loop_is_never_chosen_where_it_cannot_run(monkeypatch):
    """Bf16 output only (the sweep measured nothing else), and never inside a CUDA graph capture; with the
    offsets on the host, the table's winner for that case."""
    import moeplace.kernels.grouped_gemm as gg
    loop, tma = GemmConfig(backend=Backend.torch_loop), GemmConfig(128, 128, 8, 8, 4, backend="triton_tma")
    loop2 = GemmConfig(backend=Backend.torch_loop, streams=2)
    monkeypatch.setattr(gg, "lookup", lambda *a, **k: TableEntry(loop, tma, loop2))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, cuda) == loop
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, cuda, host_offsets=True) == loop2
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, cuda, torch_loop_ok=False) == tma
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, cuda) == tma
    assert choose_config(GemmKind.plain, 32768, 32, 4096, 7168, cuda, host_offsets=True) == tma


def test_occupancy_counts_shared_memory_and_registers():
    """Programs per SM of a compiled kernel (Triton 3.6, sm_90a, compiled here): the bound is shared memory
    or registers, whichever is lower."""
    from moeplace.kernels.grouped_gemm_kernels import Occupancy
    KB = 1024
    assert Occupancy(88 * KB, 255, 14, 4).per_sm == 2, "SwiGLU m64 k64 s4: 2 x 32K registers is the whole file"
    assert Occupancy(168 * KB, 255, 14, 4).per_sm == 1, "SwiGLU m64 k128 s4: shared memory"
    assert Occupancy(96 * KB, 186, 0, 8).per_sm == 1, "m128 n128 w8 k64 s4: 2 programs by smem, 1 by registers"
    assert Occupancy(56 * KB, 194, 0, 4).per_sm == 2, "m64 n128 k64 s4: 3 by smem, 2 by registers"
    assert Occupancy(104 * KB, 196, 0, 4).note == "smem 104 KB, 196 regs: 2/SM"
