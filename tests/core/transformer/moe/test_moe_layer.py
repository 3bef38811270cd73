"""The MoE layer equals a naive per-token computation; the grouped GEMM equals the loop;
a planted permutation bug is caught; config errors name the flag.

Tolerance: the layer and the reference do the same fp32 products, but the layer sums a
token's expert contributions with index_add and the grouped path uses a padded bmm, so
results may differ by float32 rounding (~1e-7 relative); 1e-5 is far below the planted
bug's error (order 1e-1).
"""

import pytest
import torch

from megatron.core.transformer.moe import token_dispatcher
from tests.core.transformer.moe.moe_cases import build_layer, inputs, moe_config, reference_forward

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_layer_matches_naive_reference(dispatcher):
    layer = build_layer(moe_config(moe_token_dispatcher_type=dispatcher, moe_shared_expert_intermediate_size=24))
    hidden, _ = inputs()
    out, bias = layer(hidden)
    assert bias is None
    shared, _ = layer.shared_experts(hidden)
    torch.testing.assert_close(out, reference_forward(layer, hidden) + shared, **TOL)


def test_token_dropping_matches_reference():
    layer = build_layer(moe_config(moe_expert_capacity_factor=0.5))
    hidden, _ = inputs()
    out, _ = layer(hidden)
    torch.testing.assert_close(out, reference_forward(layer, hidden), **TOL)
    _, routing_map = layer.router(hidden.reshape(-1, hidden.size(-1)))
    # capacity = ceil(32 tokens * 2 / 4 experts * 0.5) = 8 per expert
    assert routing_map.sum(dim=0).max().item() <= 8


def test_grouped_gemm_equals_loop_forward_and_backward():
    loop = build_layer(moe_config())
    grouped = build_layer(moe_config(moe_grouped_gemm=True))
    grouped.load_state_dict(loop.state_dict())
    hidden, grad = inputs()
    results = []
    for layer in (loop, grouped):
        x = hidden.clone().requires_grad_(True)
        out, _ = layer(x)
        out.backward(grad)
        results.append((out, x.grad, [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    torch.testing.assert_close(results[0][1], results[1][1], **TOL)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, **TOL)


def test_grouped_gemm_with_an_idle_expert():
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    config = moe_config()
    loop = SequentialMLP(config, 1, range(4))
    grouped = GroupedMLP(config, 1, range(4))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(7, config.hidden_size)
    counts = [3, 0, 4, 0]
    torch.testing.assert_close(loop(x, counts), grouped(x, counts), **TOL)


def test_planted_permutation_bug_fails(monkeypatch):
    """Tokens handed to the wrong expert (local expert order reversed) change the output."""
    layer = build_layer(moe_config())
    hidden, _ = inputs()
    reference = reference_forward(layer, hidden)
    original = token_dispatcher.MoEAllGatherTokenDispatcher.dispatch

    def swapped(self, tokens, probs, routing_map):
        return original(self, tokens, probs, routing_map.flip(dims=[1]))

    monkeypatch.setattr(token_dispatcher.MoEAllGatherTokenDispatcher, "dispatch", swapped)
    out, _ = layer(hidden)
    assert (out - reference).abs().max().item() > 100 * TOL["atol"]


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(moe_router_topk=5), "--moe-router-topk"),
        (dict(moe_router_num_groups=3, moe_router_group_topk=1), "--moe-router-num-groups"),
        (dict(moe_pad_expert_input_to_capacity=True), "--moe-pad-expert-input-to-capacity"),
        (dict(moe_router_enable_expert_bias=True), "--moe-router-enable-expert-bias"),
        (dict(moe_token_dispatcher_type="flex"), "--moe-token-dispatcher-type"),
        (dict(moe_layer_freq=[1, 0]), "--moe-layer-freq"),
        (dict(expert_model_parallel_size=3), "--num-experts"),
    ],
)
def test_bad_config_names_the_flag(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        moe_config(**overrides)


def test_expert_bias_moves_towards_balance():
    config = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_bias_update_rate=0.01)
    layer = build_layer(config).train()
    hidden, _ = inputs()
    with torch.enable_grad():
        layer(hidden.requires_grad_(True))
    counts = layer.router.local_tokens_per_expert.clone()
    assert counts.sum().item() == hidden.size(0) * hidden.size(1) * 2
    layer.router.update_expert_bias()
    expected = torch.sign(counts.mean() - counts) * 0.01
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert layer.router.local_tokens_per_expert.sum().item() == 0


@pytest.mark.gpu
def test_grouped_mm_on_gpu_matches_loop_in_bf16():
    """torch._grouped_mm (Hopper, bf16) against the per-expert loop; bf16 tolerance."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, grouped_mm_available

    config = moe_config(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    loop = SequentialMLP(config, 1, range(4)).cuda().bfloat16()
    grouped = GroupedMLP(config, 1, range(4)).cuda().bfloat16()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = [10, 0, 20, 7]
    assert grouped_mm_available(x, torch.empty(4, 64, 256, device="cuda", dtype=torch.bfloat16))
    a, b = loop(x, counts), grouped(x, counts)
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(a)
    ga = torch.autograd.grad(a, x, grad)[0]
    gb = torch.autograd.grad(b, x, grad)[0]
    torch.testing.assert_close(ga.float(), gb.float(), atol=2e-2, rtol=2e-2)
