import pytest
import torch

from moeplace.kernels.histogram import expert_histogram, expert_histogram_ref


@pytest.mark.parametrize("T, K, E, local", [(300, 8, 64, None), (7, 8, 32, 16), (1000, 6, 256, 100)])
def test_histogram_matches_ref(T, K, E, local, routing):
    ids, _ = routing(T, K, E, local)
    counts = expert_histogram(ids, E)
    assert torch.equal(counts.cpu(), expert_histogram_ref(ids, E).cpu())
    assert counts.sum().item() == (ids >= 0).sum().item()
    assert (counts == 0).any(), "the sampler guarantees experts with no tokens"


def test_histogram_accumulates_in_place(routing, device):
    ids1, _ = routing(50, 8, 32)
    ids2, _ = routing(70, 8, 32)
    window = torch.randint(0, 5, (32,), dtype=torch.int32, device=device)  # counts of earlier steps
    start = window.clone()
    out = expert_histogram(ids2, 32, expert_histogram(ids1, 32, window))
    assert out is window
    assert torch.equal(window.cpu(), (start + expert_histogram_ref(ids1, 32) + expert_histogram_ref(ids2, 32)).cpu())


def test_histogram_rejects_bad_inputs(device):
    with pytest.raises(AssertionError, match="must be \\[T, K\\]"):
        expert_histogram(torch.zeros(8, dtype=torch.int32, device=device), 4)
    with pytest.raises(AssertionError, match="int32"):
        expert_histogram(torch.zeros(2, 2, dtype=torch.int32, device=device), 4, torch.zeros(4, device=device))
