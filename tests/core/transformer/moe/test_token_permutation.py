"""The sync-free route plans give the rows, the order and the results of the nonzero-based
permutation they replace, forward and backward; the single-rank dispatch asks nothing of
the host.

Exactness: in fp32 the old path adds a token's terms into zeros with index_add in
ascending expert order, the new one sums its k slots in the same order, so for k <= 2 the
results are bitwise equal (0 + a = a, then a + b). For k = 3 the slot sum may associate
differently: 1e-6 there is far below a wrong row or weight (order 1e-1).
"""

import pytest
import torch

from megatron.core.transformer.moe import token_dispatcher, token_permutation
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, padded_expert_rows
from megatron.core.transformer.moe.token_permutation import (
    capacity_plan,
    combine_rows,
    dispatch_rows,
    exact_topk_plan,
    nonzero_plan,
    row_probs,
)
from tests.core.transformer.moe.moe_cases import (
    HostRead,
    build_layer,
    forbid_host_reads,
    inputs,
    moe_config,
    reference_forward,
)

HIDDEN = 8


def _routing(num_tokens, num_experts, topk, seed, idle=2):
    """Random top-k probs/map over the experts but the last ``idle`` (which get no token)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, num_experts - idle:] = -1e9
    values, index = torch.topk(logits, topk, dim=1)
    probs = torch.zeros_like(logits).scatter(1, index, torch.softmax(values, dim=-1))
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
    return probs, routing_map


def _old_dispatch_combine(tokens, probs, routing_map, expert):
    """Today's path before the plans: nonzero order, index_select, index_add."""
    expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
    rows = expert(tokens.index_select(0, token_index))
    weighted = rows * probs[token_index, expert_index].unsqueeze(-1)
    return rows.new_zeros(tokens.shape).index_add(0, token_index, weighted)


def _new_dispatch_combine(tokens, probs, plan, expert):
    rows = expert(dispatch_rows(tokens, plan))
    return combine_rows(rows, row_probs(probs, plan), plan, tokens.size(0))


CASES = [(37, 4, 1), (37, 6, 2), (53, 8, 2), (29, 5, 3), (41, 8, 3)]


@pytest.mark.parametrize("num_tokens, num_experts, topk", CASES)
def test_exact_topk_plan_is_the_nonzero_order(num_tokens, num_experts, topk):
    _, routing_map = _routing(num_tokens, num_experts, topk, seed=num_tokens)
    plan, old = exact_topk_plan(routing_map, topk), nonzero_plan(routing_map)
    assert torch.equal(plan.token_index, old.token_index)
    assert torch.equal(plan.expert_index, old.expert_index)
    assert torch.equal(plan.counts, old.counts) and plan.counts[-1].item() == 0
    assert plan.num_rows == old.num_rows == num_tokens * topk


@pytest.mark.parametrize("num_tokens, num_experts, topk", CASES)
def test_exact_topk_dispatch_and_combine_equal_index_add(num_tokens, num_experts, topk):
    probs, routing_map = _routing(num_tokens, num_experts, topk, seed=num_tokens + 1)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(num_tokens, HIDDEN, generator=gen)
    grad = torch.randn(num_tokens, HIDDEN, generator=gen)
    weight = torch.randn(HIDDEN, HIDDEN, generator=gen)

    def expert(x):  # a row-wise map, so that each row's gradient depends on its position
        return torch.tanh(x @ weight)

    results = []
    for run in (_old_dispatch_combine, _new_dispatch_combine):
        x, p = tokens.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        route = routing_map if run is _old_dispatch_combine else exact_topk_plan(routing_map, topk)
        out = run(x, p, route, expert)
        out.backward(grad)
        results.append((out.detach(), x.grad, p.grad))
    for old, new in zip(*results):
        if topk <= 2:
            assert torch.equal(old, new)
        else:
            torch.testing.assert_close(old, new, atol=1e-6, rtol=1e-6)


def test_planted_slot_bug_is_caught():
    """Combining with the slots of a wrong token order changes the output."""
    probs, routing_map = _routing(37, 6, 2, seed=9)
    tokens = torch.randn(37, HIDDEN)
    plan = exact_topk_plan(routing_map, 2)
    good = _new_dispatch_combine(tokens, probs, plan, torch.tanh)
    plan.inverse = plan.inverse.flip(0)
    bad = _new_dispatch_combine(tokens, probs, plan, torch.tanh)
    assert (good - bad).abs().max().item() > 1e-1


@pytest.mark.parametrize("factor, policy", [(0.5, "probs"), (0.7, "position"), (4.0, "probs")])
def test_capacity_plan_is_the_nonzero_order(factor, policy):
    probs, routing_map = _routing(23, 4, 2, seed=11, idle=0)
    probs, routing_map = apply_router_token_dropping(probs, routing_map, 2, factor, policy, pad_to_capacity=True)
    rows = padded_expert_rows(23, 4, 2, factor)
    assert routing_map.sum(dim=0).tolist() == [rows] * 4
    plan, old = capacity_plan(routing_map, rows), nonzero_plan(routing_map)
    assert torch.equal(plan.token_index, old.token_index)
    assert torch.equal(plan.expert_index, old.expert_index)
    assert torch.equal(plan.counts, old.counts)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_pad_to_capacity_layer_matches_reference(dispatcher, monkeypatch):
    calls = []
    monkeypatch.setattr(token_permutation, "capacity_plan", lambda *a: calls.append(1) or capacity_plan(*a))
    layer = build_layer(moe_config(moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=True,
                                   moe_token_dispatcher_type=dispatcher))
    hidden, _ = inputs()
    torch.testing.assert_close(layer(hidden)[0], reference_forward(layer, hidden), atol=1e-5, rtol=1e-5)
    assert calls


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_dropping_without_padding_keeps_the_nonzero_path(dispatcher, monkeypatch):
    calls = []
    monkeypatch.setattr(token_permutation, "nonzero_plan", lambda m: calls.append(1) or nonzero_plan(m))
    monkeypatch.setattr(token_permutation, "exact_topk_plan", None)
    layer = build_layer(moe_config(moe_expert_capacity_factor=0.5, moe_token_dispatcher_type=dispatcher))
    hidden, _ = inputs()
    torch.testing.assert_close(layer(hidden)[0], reference_forward(layer, hidden), atol=1e-5, rtol=1e-5)
    assert calls


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_single_rank_dispatch_and_combine_ask_nothing_of_the_host(dispatcher, monkeypatch):
    """Forward and backward of the dispatch and combine under ``forbid_host_reads``."""
    layer = build_layer(moe_config(moe_token_dispatcher_type=dispatcher))
    tokens = inputs()[0].reshape(-1, 16).requires_grad_(True)
    probs, routing_map = layer.router(tokens)
    forbid_host_reads(monkeypatch)
    expert_input, counts, state = layer.token_dispatcher.dispatch(tokens, probs, routing_map)
    out = layer.token_dispatcher.combine(expert_input * 2.0, state)
    out.sum().backward()
    monkeypatch.undo()
    assert isinstance(counts, torch.Tensor) and counts.sum().item() == tokens.size(0) * 2
    assert tokens.grad is not None


def test_host_read_check_can_fail(monkeypatch):
    """The guard above catches the nonzero the old path used."""
    forbid_host_reads(monkeypatch)
    _, routing_map = _routing(7, 4, 2, seed=1)
    with pytest.raises(HostRead):
        nonzero_plan(routing_map)


def test_dispatcher_on_one_rank_uses_the_exact_topk_plan(monkeypatch):
    calls = []
    monkeypatch.setattr(token_permutation, "exact_topk_plan", lambda m, k: calls.append(k) or exact_topk_plan(m, k))
    layer = build_layer(moe_config())
    assert isinstance(layer.token_dispatcher, token_dispatcher.MoEAllGatherTokenDispatcher)
    hidden, _ = inputs()
    layer(hidden)
    assert calls == [2]


def test_sliced_maps_do_not_assume_padded_counts():
    """Without sequence parallelism each tensor-parallel rank dispatches a slice of the
    router's rows: k routes per token still hold, the padded per-expert counts do not."""
    config = moe_config(moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=True)
    probs, routing_map = _routing(24, 4, 2, seed=3, idle=0)
    _, routing_map = apply_router_token_dropping(probs, routing_map, 2, 0.5, "probs", pad_to_capacity=True)
    half = routing_map[:12]
    layout = token_permutation.RoutingLayout.from_config(config, whole_maps=False)
    plan, old = layout.plan(half), nonzero_plan(half)
    assert torch.equal(plan.token_index, old.token_index) and torch.equal(plan.counts, old.counts)
    whole = token_permutation.RoutingLayout.from_config(config).plan(routing_map)
    assert torch.equal(whole.token_index, nonzero_plan(routing_map).token_index)
