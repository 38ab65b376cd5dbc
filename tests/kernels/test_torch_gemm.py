"""The torch loop backend's helpers: the per-expert scale layout cuBLAS reads, the streams its GEMMs go
to, host offsets, and SiLU·up + requantise. (The loop itself needs cuBLAS's block-scaled _scaled_mm:
test_grouped_gemm's gpu tests.)"""

import pytest
import torch

from moeplace.kernels.grouped_gemm import swiglu_quant_ref
from moeplace.kernels.torch_gemm import ROW_ALIGN, _scales_by_expert, check_host_offsets, expert_spans, \
    stream_lanes, swiglu_quant


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
                assert lane_of[x] == lane_of[x + 1], f"experts {x} ({rows[x]} rows) and {x + 1} on different streams"
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
