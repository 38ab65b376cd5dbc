"""The torch loop backend's helpers: the per-expert scale layout cuBLAS reads, the streams its GEMMs go
to, host offsets, and SiLU·up + requantise. (The loop itself needs cuBLAS's block-scaled _scaled_mm:
test_grouped_gemm's gpu tests.)"""

import pytest
import torch

from moeplace.kernels.grouped_gemm import swiglu_quant_ref
from moeplace.kernels.fp8_quant import quant_weight_blocks_ref
from moeplace.kernels.grouped_gemm import grouped_gemm_ref
from moeplace.kernels.torch_gemm import ROW_ALIGN, _scales_by_expert, check_host_offsets, expert_spans, \
    grouped_gemm_torch, stream_lanes, swiglu_quant


def test_scales_by_expert_are_transposed_and_padded(gen, device):
    counts = [5, 0, 8, 1, 130]
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=device)
    a_s = torch.rand(sum(counts) + 3, 7, generator=gen).to(device)  # 3 rows past the last expert
    flat, base = _scales_by_expert(a_s, offsets), 0
    for e, n in enumerate(counts):
        m = -(-n // ROW_ALIGN) * ROW_ALIGN
        s = flat[base: base + 7 * m].view(7, m).t()  # [m, Kb] with strides (1, m): what cuBLAS checks
        lo = int(offsets[e])
        assert torch.equal(s[:n].cpu(), a_s[lo:lo + n].cpu()) and (s[n:] == 1).all(), f"expert {e}"
        base += 7 * m


def test_swiglu_quant_matches_ref(gen, device, poisoned, rel_err):
    h = (torch.randn(37, 512, generator=gen) * 3).to(device)
    q, s = swiglu_quant(h)
    q_ref, s_ref = swiglu_quant_ref(h)
    # float32 both sides; the kernel's sigmoid and the reference's silu may differ in the last bit
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the fp8 bytes agree"
    assert rel_err(s, s_ref) < 1e-6


@pytest.mark.ref_only
@pytest.mark.parametrize("lanes", [1, 2, 3, 4, 8])
def test_stream_lanes_keep_padded_neighbours_in_order(lanes, gen):
    for _ in range(50):
        rows = (torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
                * torch.randint(1, 5, (1,), generator=gen)).tolist()  # sometimes all multiples of 4
        out = stream_lanes(rows, lanes)
        assert len(out) == lanes and sorted(x for lane in out for x in lane) == list(range(len(rows)))
        lane_of = {x: i for i, lane in enumerate(out) for x in lane}
        for lane in out:
            assert lane == sorted(lane), "each stream runs its experts in expert order"
        for x in range(len(rows) - 1):
            if rows[x] % ROW_ALIGN:  # its padding rows are the next expert's first rows
                assert lane_of[x] == lane_of[x + 1], f"experts {x} ({rows[x]} rows) and {x + 1} apart"
        loads = [sum(rows[x] for x in lane) for lane in out]
        if lanes > 1 and all(n % ROW_ALIGN == 0 for n in rows):  # every expert its own chain: LPT's bound
            assert max(loads) <= sum(rows) / lanes + max(rows), f"unbalanced {loads}"


@pytest.mark.ref_only
def test_host_offsets_are_checked_and_spans_skip_empty_experts():
    assert expert_spans([0, 3, 3, 8]) == [(0, 0, 3), (2, 3, 8)]
    assert check_host_offsets((0, 3, 3, 8), 3, 10) == [0, 3, 3, 8]
    with pytest.raises(AssertionError, match="expert_offsets_host has 3 entries, want E \\+ 1 = 4"):
        check_host_offsets([0, 3, 8], 3, 10)
    with pytest.raises(AssertionError, match="non-decreasing within \\[0, M=10\\]"):
        check_host_offsets([0, 5, 3, 8], 3, 10)
    with pytest.raises(AssertionError, match="non-decreasing within \\[0, M=7\\]"):
        check_host_offsets([0, 3, 3, 8], 3, 7)


def scaled_mm_blockwise_ref(a, b, scale_a, scale_b, *, out_dtype, out):
    """torch._scaled_mm's 1×128 / 128×128 block-scaled recipe in float64, asserting the layouts cuBLAS
    checks (rows a multiple of 4, scales outer-dim-major): the CPU stand-in for the one cuBLAS call."""
    (m, K), N = a.shape, b.shape[1]
    assert not a.double().isnan().any(), "spare rows (NaN bytes here) reached cuBLAS"
    assert m % ROW_ALIGN == 0 and b.shape[0] == K and b.stride() == (1, K), f"{a.shape} {b.shape} {b.stride()}"
    assert scale_a.shape == (m, K // 128) and scale_a.stride() == (1, m), f"{scale_a.shape} {scale_a.stride()}"
    assert scale_b.shape == (K // 128, N // 128) and scale_b.stride() == (1, K // 128)
    a64 = a.double() * scale_a.double().repeat_interleave(128, 1)
    b64 = b.double() * scale_b.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return out.copy_((a64 @ b64).to(out_dtype))


@pytest.mark.parametrize("streams", [1, 3])
def test_loop_slices_pads_and_scales_each_expert(streams, gen, monkeypatch, rel_err):
    """The loop's own bookkeeping (spans, padded scale layout, zero tails past the last expert, lanes) on
    CPU, cuBLAS's call replaced by its float64 recipe: rows 0..used equal the grouped reference."""
    if torch.cuda.is_available():
        pytest.skip("the CPU stand-in for _scaled_mm: the GPU runs the real one (test_grouped_gemm)")
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_blockwise_ref)
    counts = [5, 0, 8, 3, 0, 6, 1, 0]  # a 5-row expert padded past a 1-row last expert, empty ones between
    off = [0, *torch.tensor(counts).cumsum(0).tolist()]
    used, M, K, N = off[-1], off[-1] + 7, 256, 384
    a = (torch.randn(M, K, generator=gen) * 4).to(torch.float8_e4m3fn)
    a.view(torch.uint8)[used:] = 0x7F  # spare rows: NaN bytes, never to reach a valid row
    a_s = torch.rand(M, K // 128, generator=gen) + 0.5
    b, b_s = quant_weight_blocks_ref(torch.randn(len(counts), N, K, generator=gen) / K**0.5)
    off_E1 = torch.tensor(off, dtype=torch.int32)
    c = grouped_gemm_torch(a, a_s, b, b_s, off_E1, torch.float32, offsets_host=off, streams=streams)
    assert c.shape == (M, N)
    assert rel_err(c[:used], grouped_gemm_ref(a[:used], a_s[:used], b, b_s, off_E1)[:used]) < 1e-6
