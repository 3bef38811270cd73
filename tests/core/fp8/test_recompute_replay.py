"""Delayed FP8 scaling under activation recompute: a checkpointed forward equals the plain one.

Two FP8 linears (and a GeLU between them) run over three micro-batches, in the order a
pipeline schedule may use: forward 1, forward 2, backward 1, forward 3, backward 2,
backward 3, so other forwards move the scaling states on between a micro-batch's forward
and its recompute. Once plainly and once through ``tensor_parallel.checkpoint``, in the
fp32 emulation: the outputs, the input and weight gradients and the final scaling states
(amax histories and scales) must be equal bit for bit. The dense linear and the MoE
experts' grouped linear are both checked.
"""

import pytest
import torch

from megatron.core.fp8 import recompute_replay
from megatron.core.fp8.gemm import EMULATION
from megatron.core.fp8.grouped_linear import fp8_grouped_linear
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling
from megatron.core.tensor_parallel.random import checkpoint

ORDER = [("f", 0), ("f", 1), ("b", 0), ("f", 2), ("b", 1), ("b", 2)]


def _states(n):
    recipe = Fp8Recipe(fmt="hybrid", recipe="delayed", amax_history_len=4, amax_compute_algo="max", emulation=True)
    return [Fp8Scaling(recipe, device=torch.device("cpu")) for _ in range(n)]


def _dense_block(w1, w2, states):
    def block(x):
        h = fp8_linear(x, w1, states[0], backend=EMULATION)
        return fp8_linear(torch.nn.functional.gelu(h), w2, states[1], backend=EMULATION)
    return block


def _grouped_block(w1, w2, states, counts):
    def block(x):
        h = fp8_grouped_linear(x, w1, states[0], counts, amax_group=None, backend=EMULATION)
        return fp8_grouped_linear(torch.nn.functional.gelu(h), w2, states[1], counts, amax_group=None,
                                  backend=EMULATION)
    return block


def _run(make_block, weights, states, inputs, recompute: bool):
    """Outputs, input gradients, and after all micro-batches the weight gradients and the states."""
    block = make_block(*weights, states)
    distribute_saved_activations = False  # one process: nothing to spread over ranks
    outputs, pending, x_grads = {}, {}, {}
    for kind, i in ORDER:
        if kind == "f":
            x = inputs[i].clone().requires_grad_()
            y = checkpoint(block, distribute_saved_activations, x) if recompute else block(x)
            outputs[i], pending[i] = y.detach().clone(), (x, y)
        else:
            x, y = pending.pop(i)
            y.backward(torch.ones_like(y) * (i + 1) * 1e-2)
            x_grads[i] = x.grad
    flat_states = [t.clone() for s in _flatten(states) for t in (s.amax_history, s.scale)]
    return outputs, x_grads, [w.grad.clone() for w in weights], flat_states


def _flatten(states):
    return [s for group in states for s in (group if isinstance(group, list) else [group])]


def _dense_case():
    torch.manual_seed(0)
    w1 = (torch.randn(48, 32) * 0.1).requires_grad_()
    w2 = (torch.randn(32, 48) * 0.1).requires_grad_()
    inputs = [torch.randn(16, 32) * (1 + i) for i in range(3)]  # the amaxes differ from step to step
    return _dense_block, (w1, w2), lambda: _states(2), inputs


def _grouped_case():
    torch.manual_seed(0)
    experts = 3
    w1 = (torch.randn(experts, 48, 32) * 0.1).requires_grad_()
    w2 = (torch.randn(experts, 32, 48) * 0.1).requires_grad_()
    counts = torch.tensor([5, 0, 11])  # an expert without tokens included
    inputs = [torch.randn(16, 32) * (1 + i) for i in range(3)]

    def make(w1, w2, states):
        return _grouped_block(w1, w2, states, counts)
    return make, (w1, w2), lambda: [_states(experts), _states(experts)], inputs


def _fresh(weights):
    return tuple(w.detach().clone().requires_grad_() for w in weights)


@pytest.mark.parametrize("case", [_dense_case, _grouped_case], ids=["dense", "grouped-experts"])
def test_recompute_equals_the_plain_forward_bit_for_bit(case):
    make_block, weights, new_states, inputs = case()
    plain = _run(make_block, _fresh(weights), new_states(), inputs, recompute=False)
    recomputed = _run(make_block, _fresh(weights), new_states(), inputs, recompute=True)
    for name, a, b in zip(("outputs", "input gradients"), plain[:2], recomputed[:2]):
        for i in a:
            assert torch.equal(a[i], b[i]), f"{name}, micro-batch {i}"
    for a, b in zip(plain[2] + plain[3], recomputed[2] + recomputed[3]):
        assert torch.equal(a, b)


def test_without_the_replay_the_recompute_differs(monkeypatch):
    """The check can fail: a recompute that quantizes with the advanced scales (and records
    its amaxes again) moves the gradients and the states."""
    make_block, weights, new_states, inputs = _dense_case()
    plain = _run(make_block, _fresh(weights), new_states(), inputs, recompute=False)
    monkeypatch.setattr(recompute_replay, "replaying_now", lambda: None)
    recomputed = _run(make_block, _fresh(weights), new_states(), inputs, recompute=True)
    assert all(torch.equal(plain[0][i], recomputed[0][i]) for i in plain[0])  # the first forwards agree
    assert not all(torch.equal(a, b) for a, b in zip(plain[2] + plain[3], recomputed[2] + recomputed[3]))


def test_a_recompute_that_runs_other_linears_is_refused():
    states = _states(2)
    record = recompute_replay.Record()
    record.note(states[0], 0, torch.ones(1))
    with recompute_replay.replaying(record):
        assert torch.equal(states[0]._replayed_scale(0), torch.ones(1))
        with pytest.raises(RuntimeError, match="more FP8 operands than the first forward"):
            states[0]._replayed_scale(1)
    record.position = 0
    with recompute_replay.replaying(record), pytest.raises(RuntimeError, match="in another order"):
        states[1]._replayed_scale(0)
