"""--moe-shared-expert-gate and --moe-apply-probs-on-input: each equals its hand
computation, leaves the other weights alone, refuses combinations Megatron refuses, and
splits over tensor-parallel ranks like the rest of the layer.

Tolerance: the layer and the hand computations do the same fp32 products in another
order (matmul blocking, sums over experts): float32 rounding, ~1e-7 relative; 1e-5 is far
below what a missing gate or a prob applied on the wrong side changes (order 1e-1).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import apply_probs_on_input
from megatron.training.arguments import parse_and_validate
from tests.core.transformer.moe.moe_cases import (
    SEQ,
    build_layer,
    forbid_host_reads,
    inputs,
    moe_config,
    reference_forward,
)
from tests.multirank import run_on_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
SHARED = 24


def _shared_by_hand(mlp, x):
    """fc2(silu(gate) * up) with fc1 = [gate; up] (the test config is SwiGLU without biases)."""
    gate, up = F.linear(x, mlp.linear_fc1.weight).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)


def test_shared_expert_gate_equals_hand_computation():
    plain = build_layer(moe_config(moe_shared_expert_intermediate_size=SHARED))
    gated = build_layer(moe_config(moe_shared_expert_intermediate_size=SHARED, moe_shared_expert_gate=True))
    gate = gated.shared_experts.gate_weight
    assert tuple(gate.shape) == (1, 16)
    assert "shared_experts.gate_weight" in gated.state_dict()
    assert "shared_experts.gate_weight" not in plain.state_dict()
    # The gate is drawn last: every other weight is the one the layer without it gets.
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(gated.state_dict()[name], tensor, atol=0, rtol=0)
    hidden, _ = inputs()
    routed = reference_forward(plain, hidden)
    plain_out, _ = plain(hidden)
    torch.testing.assert_close(plain_out, routed + _shared_by_hand(plain.shared_experts, hidden), **TOL)
    gated_out, _ = gated(hidden)
    by_hand = routed + torch.sigmoid(hidden @ gate.t()) * _shared_by_hand(plain.shared_experts, hidden)
    torch.testing.assert_close(gated_out, by_hand, **TOL)
    assert (gated_out - plain_out).abs().max().item() > 100 * TOL["atol"]


def test_shared_expert_gate_gets_a_gradient():
    layer = build_layer(moe_config(moe_shared_expert_intermediate_size=SHARED, moe_shared_expert_gate=True))
    hidden, grad = inputs()
    out, _ = layer(hidden)
    out.backward(grad)
    assert layer.shared_experts.gate_weight.grad.abs().sum().item() > 0


def _top1_by_hand(layer, hidden):
    """sum over each token's expert of expert(prob * token), one token at a time."""
    tokens = hidden.reshape(-1, hidden.size(-1))
    probs, routing_map = layer.router(tokens, seq_length=hidden.size(0), batch_size=hidden.size(1))
    rows = []
    for t in range(tokens.size(0)):
        (e,) = routing_map[t].nonzero().flatten().tolist()
        rows.append(layer.experts.local_experts[e](probs[t, e] * tokens[t : t + 1])[0])
    return torch.stack(rows).view_as(hidden)


@pytest.mark.parametrize("dispatcher, grouped", [("allgather", False), ("alltoall", True)])
def test_probs_on_input_equals_hand_computation(dispatcher, grouped):
    # Softmax over all experts first: top-1 probs below 1 (a softmax over the one chosen logit is 1).
    config = dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_token_dispatcher_type=dispatcher,
                  moe_grouped_gemm=grouped)
    layer = build_layer(moe_config(moe_apply_probs_on_input=True, **config))
    hand = build_layer(moe_config(moe_apply_probs_on_input=True, **config))
    hidden, grad = inputs()
    out, _ = layer(hidden)
    expected = _top1_by_hand(hand, hidden)
    torch.testing.assert_close(out, expected, **TOL)
    # The experts are not linear: the prob on the output side gives another result.
    assert (reference_forward(hand, hidden) - out).abs().max().item() > 100 * TOL["atol"]
    # The router learns through the scaled input, as in the hand computation.
    out.backward(grad)
    expected.backward(grad)
    assert layer.router.weight.grad.abs().sum().item() > 0
    torch.testing.assert_close(layer.router.weight.grad, hand.router.weight.grad, **TOL)


def test_probs_on_input_adds_no_host_read(monkeypatch):
    """The scaling keeps the one-rank dispatch and combine free of host reads (the experts
    themselves are outside this check: the CPU loop needs its token counts)."""
    layer = build_layer(moe_config(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True))
    tokens = inputs()[0].reshape(-1, 16).requires_grad_(True)
    forbid_host_reads(monkeypatch)
    probs, routing_map = layer.router(tokens)
    scaled, unit_probs = apply_probs_on_input(tokens, probs)
    expert_input, _, state = layer.token_dispatcher.dispatch(scaled, unit_probs, routing_map)
    out = layer.token_dispatcher.combine(expert_input * 2.0, state)
    out.sum().backward()
    monkeypatch.undo()
    assert tokens.grad is not None and layer.router.weight.grad is not None
    torch.testing.assert_close(out, 2.0 * probs.sum(dim=1, keepdim=True) * tokens, **TOL)


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_shared_expert_gate=True), "--moe-shared-expert-gate gates the shared expert, which needs "
                                        "--moe-shared-expert-intermediate-size"),
    (dict(moe_apply_probs_on_input=True), r"--moe-apply-probs-on-input needs --moe-router-topk 1 \(got 2\)"),
])
def test_bad_combinations_name_both_flags(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_config(**overrides)


def test_flags_reach_the_config():
    base = ("--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 16 --max-position-embeddings 16 "
            "--micro-batch-size 1 --lr 1e-3 --num-experts 4 --moe-shared-expert-intermediate-size 32 "
            "--moe-shared-expert-gate --moe-apply-probs-on-input").split()
    with pytest.raises(ValueError, match="--moe-apply-probs-on-input needs --moe-router-topk 1"):
        parse_and_validate(base, world_size=1, rank=0)
    args = parse_and_validate(base + ["--moe-router-topk", "1"], world_size=1, rank=0)
    assert args.moe_shared_expert_gate and args.moe_apply_probs_on_input


OPTIONS = dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True, moe_shared_expert_intermediate_size=SHARED,
               moe_shared_expert_gate=True)


def _run_tp2_sp(rank, world_size):
    groups = parallel_state.initialize_model_parallel(2, 1)
    layer = build_layer(moe_config(tensor_model_parallel_size=2, sequence_parallel=True, **OPTIONS), groups)
    hidden, grad = inputs()
    rows = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)
    out, _ = layer(hidden[rows])
    out.backward(grad[rows])
    # What makes the training loop sum the gate's gradient over tensor-parallel ranks.
    assert getattr(layer.shared_experts.gate_weight, "sequence_parallel") is True
    grads = {}
    for name, param in (("gate_grad", layer.shared_experts.gate_weight), ("router_grad", layer.router.weight)):
        # Replicated weights that saw only this rank's tokens: their gradient sums over TP.
        grads[name] = param.grad.clone()
        dist.all_reduce(grads[name], group=groups.tp)
    return {"rows": rows, "out": out.detach(), "gate": layer.shared_experts.gate_weight.detach(), **grads}


def test_tp2_sequence_parallel_matches_one_process():
    layer = build_layer(moe_config(**OPTIONS))
    hidden, grad = inputs()
    out, _ = layer(hidden)
    out.backward(grad)
    for res in run_on_ranks(_run_tp2_sp, 2):
        torch.testing.assert_close(res["gate"], layer.shared_experts.gate_weight.detach(), atol=0, rtol=0)
        torch.testing.assert_close(res["out"], out.detach()[res["rows"]], **TOL)
        torch.testing.assert_close(res["gate_grad"], layer.shared_experts.gate_weight.grad, **TOL)
        torch.testing.assert_close(res["router_grad"], layer.router.weight.grad, **TOL)
