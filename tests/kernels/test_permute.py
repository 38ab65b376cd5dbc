import pytest
import torch

from moeplace.kernels.permute import (RoutingPlan, moe_routing_plan, moe_routing_plan_ref, permute_quant,
                                      permute_quant_ref, unpermute_combine, unpermute_combine_ref)

SHAPES = [(1, 8, 16, None), (45, 8, 32, None), (200, 8, 256, None), (33, 4, 24, 12)]  # (T, K, E, local)


@pytest.mark.parametrize("T, K, E, local", SHAPES)
def test_plan_matches_stable_sort(T, K, E, local, routing, poisoned):
    ids, _ = routing(T, K, E, local)
    plan, ref = moe_routing_plan(ids, E), moe_routing_plan_ref(ids, E)
    assert torch.equal(plan.expert_offsets_E1.cpu(), ref.expert_offsets_E1.cpu())
    assert torch.equal(plan.row_pos_TK.cpu(), ref.row_pos_TK.cpu())


def test_plan_all_rows_on_one_expert(device, poisoned):
    ids = torch.full((150, 8), 5, dtype=torch.int32, device=device)
    ids[::7, 3] = -1
    plan = moe_routing_plan(ids, 8)
    ref = moe_routing_plan_ref(ids, 8)
    assert torch.equal(plan.row_pos_TK.cpu(), ref.row_pos_TK.cpu())
    assert plan.expert_offsets_E1.tolist() == [0] * 6 + [int((ids >= 0).sum())] * 3


@pytest.mark.parametrize("T, K, E, local", SHAPES)
def test_permute_quant_matches_ref(T, K, E, local, routing, gen, device, poisoned):
    ids, _ = routing(T, K, E, local)
    x = (torch.randn(T, 256, generator=gen) * 3).to(torch.bfloat16).to(device)
    plan = moe_routing_plan_ref(ids, E)
    a, s = permute_quant(x, plan)
    a_ref, s_ref = permute_quant_ref(x, plan)
    used = plan.expert_offsets_E1[-1].item()
    assert torch.equal(a[:used].view(torch.uint8).cpu(), a_ref[:used].view(torch.uint8).cpu())
    assert torch.equal(s[:used].cpu(), s_ref[:used].cpu())
    assert s[used:].isnan().all(), "rows past the last expert must stay unwritten"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("T, K, E, local", SHAPES)
def test_unpermute_combine_matches_ref(T, K, E, local, dtype, tol, routing, gen, device, poisoned, rel_err):
    ids, w = routing(T, K, E, local)
    plan = moe_routing_plan_ref(ids, E)
    y = torch.randn(T * K, 384, generator=gen).to(dtype).to(device)
    y[plan.expert_offsets_E1[-1].item():] = float("nan")  # unused rows must never be read
    out = unpermute_combine(y, plan, w)
    ref = unpermute_combine_ref(y, plan, w)
    assert out.dtype == dtype and rel_err(out, ref) < tol, f"relative error {rel_err(out, ref)}"
    none_routed = (ids < 0).all(dim=1)
    assert (out[none_routed] == 0).all(), "a token routed to no local expert gets zeros"


def test_plan_rejects_bad_inputs(device):
    with pytest.raises(AssertionError, match="int32"):
        RoutingPlan(torch.zeros(5, device=device), torch.zeros(2, 2, dtype=torch.int32, device=device))
    plan = moe_routing_plan_ref(torch.randint(0, 4, (3, 2), dtype=torch.int32, device=device), 4)
    with pytest.raises(AssertionError, match="plan has 3 tokens, activations have 5"):
        permute_quant(torch.randn(5, 128, device=device), plan)
    with pytest.raises(AssertionError, match="y_MD must be"):
        unpermute_combine(torch.randn(5, 128, device=device), plan, torch.rand(3, 2, device=device))


@pytest.mark.parametrize("T, K, E, local", [(45, 8, 32, None), (200, 8, 256, None), (33, 4, 24, 12)])
def test_plan_one_program_per_block_matches_stable_sort(T, K, E, local, routing, poisoned, monkeypatch):
    """The prefill path (a program per block of ids, two launches), forced on small inputs."""
    import moeplace.kernels.permute as permute
    monkeypatch.setattr(permute, "ONE_PROGRAM_MAX_ROWS", 0)
    ids, _ = routing(T, K, E, local)
    plan, ref = moe_routing_plan(ids, E), moe_routing_plan_ref(ids, E)
    assert torch.equal(plan.expert_offsets_E1.cpu(), ref.expert_offsets_E1.cpu())
    assert torch.equal(plan.row_pos_TK.cpu(), ref.row_pos_TK.cpu())
