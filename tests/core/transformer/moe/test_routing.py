"""Routing, capacity and balancing losses against values computed by hand."""

import math

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    get_capacity,
    sequence_load_balancing_loss_func,
    sinkhorn,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)

LOGITS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 2.0]])


def test_topk_then_softmax():
    probs, routing_map = topk_routing_with_score_function(LOGITS, topk=2)
    e = math.e
    # token 0: experts 2 (logit 3) and 1 (logit 2): softmax over the two
    assert routing_map[0].tolist() == [False, True, True, False]
    assert probs[0, 2].item() == pytest.approx(e / (1 + e), abs=1e-7)
    assert probs[0, 1].item() == pytest.approx(1 / (1 + e), abs=1e-7)
    # token 1: experts 3 (2.0) and 0 (0.5)
    assert routing_map[1].tolist() == [True, False, False, True]
    assert probs[1, 3].item() == pytest.approx(1 / (1 + math.exp(-1.5)), abs=1e-7)
    assert probs[0, 0].item() == 0.0 and probs[0, 3].item() == 0.0


def test_pre_softmax_keeps_full_softmax_probs():
    probs, routing_map = topk_routing_with_score_function(LOGITS, topk=2, use_pre_softmax=True)
    full = torch.softmax(LOGITS, dim=-1)
    assert torch.allclose(probs[routing_map], full[routing_map])
    assert probs[0].sum().item() == pytest.approx((full[0, 1] + full[0, 2]).item(), abs=1e-7)


def test_scaling_factor_multiplies_probs():
    base, _ = topk_routing_with_score_function(LOGITS, topk=2)
    scaled, _ = topk_routing_with_score_function(LOGITS, topk=2, scaling_factor=2.5)
    assert torch.allclose(scaled, 2.5 * base)


def test_sigmoid_scores_normalized_and_bias_only_selects():
    probs, routing_map = topk_routing_with_score_function(LOGITS, topk=2, score_function="sigmoid")
    s = torch.sigmoid(LOGITS[0])
    assert routing_map[0].tolist() == [False, True, True, False]
    assert probs[0, 2].item() == pytest.approx((s[2] / (s[1] + s[2])).item(), abs=1e-7)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # forces expert 3 into every selection
    probs_b, map_b = topk_routing_with_score_function(LOGITS, topk=2, score_function="sigmoid", expert_bias=bias)
    assert map_b[0].tolist() == [False, False, True, True]
    # the probabilities come from the unbiased scores
    assert probs_b[0, 3].item() == pytest.approx((s[3] / (s[2] + s[3])).item(), abs=1e-7)


def test_group_limited_routing_stays_in_best_group():
    # groups {0,1} and {2,3}; group score = best expert's logit (topk 2 / group_topk 1 = 1... 2)
    logits = torch.tensor([[5.0, 4.0, 4.5, 0.0]])
    _, free = topk_routing_with_score_function(logits, topk=2)
    assert free[0].tolist() == [True, False, True, False]
    _, limited = topk_routing_with_score_function(logits, topk=2, num_groups=2, group_topk=1)
    # group {0,1} sums its top-2 to 9.0 > 4.5: both experts come from it
    assert limited[0].tolist() == [True, True, False, False]


def test_capacity_formula():
    assert get_capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert get_capacity(8, 4, 1.5) == 3
    assert get_capacity(8, 4, 0.1, min_capacity=2) == 2


def _hand_map():
    # 4 tokens, 2 experts, top-1: expert 0 gets tokens 0, 1, 2; expert 1 gets token 3.
    probs = torch.tensor([[0.6, 0.0], [0.9, 0.0], [0.7, 0.0], [0.0, 0.8]])
    return probs, probs > 0


def test_drop_by_probs_keeps_highest():
    probs, routing_map = _hand_map()
    # capacity = ceil(4 * 1 / 2 * 1.0) = 2: expert 0 keeps tokens 1 (0.9) and 2 (0.7)
    new_probs, new_map = apply_router_token_dropping(probs, routing_map, 1, 1.0, "probs")
    assert new_map[:, 0].tolist() == [False, True, True, False]
    assert new_map[:, 1].tolist() == [False, False, False, True]
    assert new_probs[0, 0].item() == 0.0 and new_probs[1, 0].item() == pytest.approx(0.9)


def test_drop_by_position_keeps_earliest():
    probs, routing_map = _hand_map()
    _, new_map = apply_router_token_dropping(probs, routing_map, 1, 1.0, "position")
    assert new_map[:, 0].tolist() == [True, True, False, False]


def test_pad_to_capacity_fills_every_expert():
    probs, routing_map = _hand_map()
    new_probs, new_map = apply_router_token_dropping(probs, routing_map, 1, 1.0, "probs", pad_to_capacity=True)
    assert new_map.sum(dim=0).tolist() == [2, 2]
    # expert 1's filler token has probability 0, so it adds nothing to the output
    filler = new_map[:, 1] & ~routing_map[:, 1]
    assert filler.sum().item() == 1 and new_probs[filler, 1].abs().sum().item() == 0.0


def test_switch_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    tokens_per_expert = torch.tensor([2.0, 1.0])  # top-1 counts
    # E * sum_i f_i P_i * coeff with f = [2/3, 1/3], P = [2.0/3, 1.0/3]
    expected = 2 * (2 / 3 * 2.0 / 3 + 1 / 3 * 1.0 / 3) * 0.1
    got = switch_load_balancing_loss_func(probs, tokens_per_expert, 3, 1, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_aux_loss_of_one_sequence_equals_aux_loss():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 4), dim=-1)
    routing_map = torch.zeros(6, 4, dtype=torch.bool).scatter(1, probs.topk(2)[1], True)
    seq = sequence_load_balancing_loss_func(probs, routing_map, 6, 1, 2, 0.01)
    full = switch_load_balancing_loss_func(probs, routing_map.sum(0).float(), 6, 2, 0.01)
    assert seq.item() == pytest.approx(full.item(), rel=1e-6)
    # two sequences [s, b] interleaved: the mean of their own losses
    two = sequence_load_balancing_loss_func(probs, routing_map, 3, 2, 2, 0.01)
    per = [switch_load_balancing_loss_func(probs[j::2], routing_map[j::2].sum(0).float(), 3, 2, 0.01) for j in (0, 1)]
    assert two.item() == pytest.approx(((per[0] + per[1]) / 2).item(), rel=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2 * 0.5
    assert z_loss_func(logits, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_sinkhorn_balances_rows_and_columns():
    torch.manual_seed(0)
    out = sinkhorn(torch.randn(8, 4), tol=1e-6)
    assert torch.allclose(out.sum(dim=0), torch.full((4,), 1 / 4), atol=1e-4)
    assert torch.allclose(out.sum(dim=1), torch.full((8,), 1 / 8), atol=1e-4)


def test_aux_loss_autoscaler_adds_scaled_gradient():
    w = torch.tensor(2.0, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    aux = w * w  # d aux / d w = 4
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.25))
    try:
        y = MoEAuxLossAutoScaler.apply(x, aux)
        assert torch.equal(y, x)
        y.sum().backward()
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    assert w.grad.item() == pytest.approx(0.25 * 4)
    assert torch.equal(x.grad, torch.ones(3))
