"""The auxiliary-loss scale passes from the schedule to the MoE router through a context,
not through state the schedule leaves behind (megatron/core/transformer/aux_loss_scale.py)."""

import types

import pytest
import torch

from megatron.core.pipeline_parallel.schedules import forward_step
from megatron.core.tensor_parallel.random import checkpoint
from megatron.core.transformer.aux_loss_scale import auxiliary_loss_scale, current_auxiliary_loss_scale
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def _aux_gradient(run) -> float:
    """d objective / d w for aux = w * w (d aux / d w = 4 at w = 2), attached by ``run``."""
    w = torch.tensor(2.0, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    run(x, w * w).sum().backward()
    return w.grad.item() / 4


def test_scale_lives_only_inside_its_block():
    assert current_auxiliary_loss_scale() is None
    with auxiliary_loss_scale(0.25):
        assert current_auxiliary_loss_scale() == 0.25
        with auxiliary_loss_scale(0.5):
            assert current_auxiliary_loss_scale() == 0.5
        assert current_auxiliary_loss_scale() == 0.25
    assert current_auxiliary_loss_scale() is None


def test_autoscaler_keeps_the_forward_scale_for_a_later_backward():
    def run(x, aux):
        with auxiliary_loss_scale(0.125):
            out = MoEAuxLossAutoScaler.apply(x, aux)
        return out  # backward runs after the block has closed

    assert _aux_gradient(run) == pytest.approx(0.125)
    assert _aux_gradient(MoEAuxLossAutoScaler.apply) == pytest.approx(1.0)


@pytest.mark.parametrize("per_token, cp_size, expected", [(False, 1, 0.25), (False, 2, 0.5), (True, 2, 1.0)])
def test_schedule_forward_step_hands_the_main_loss_scale_to_the_model(per_token, cp_size, expected):
    seen = []

    def forward_step_func(data_iterator, model):
        seen.append(current_auxiliary_loss_scale())
        return torch.ones(()), lambda out: (out, {})

    config = types.SimpleNamespace(calculate_per_token_loss=per_token)
    before = MoEAuxLossAutoScaler.main_loss_backward_scale
    forward_step(forward_step_func, None, torch.nn.Identity(), 4, config, cp_size)
    assert seen == [expected]
    assert current_auxiliary_loss_scale() is None
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is before  # no state left behind


def test_recompute_sees_the_forward_scale():
    """With activation recompute the router runs again during backward, outside the
    schedule's block; the recompute must still give the forward's scale."""
    w = torch.tensor(2.0, requires_grad=True)

    def layer(x):
        return MoEAuxLossAutoScaler.apply(x * 1.0, w * w)

    x = torch.ones(3, requires_grad=True)
    distribute_saved_activations = False
    with auxiliary_loss_scale(0.25):
        out = checkpoint(layer, distribute_saved_activations, x)
    out.sum().backward()
    assert w.grad.item() == pytest.approx(0.25 * 4)
