"""Lion (--optimizer lion) against a hand computation, and through the Megatron wrappers."""

import math

import pytest
import torch

from megatron.core.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    Lion,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.optimizer.param_state import model_space_state


def _sign(x: float) -> float:
    return math.copysign(1.0, x) if x != 0.0 else 0.0


def test_three_steps_match_a_hand_computation_with_weight_decay():
    """Per element: c = b1*m + (1-b1)*g; p = p*(1 - lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g.
    At step 2 the first element's grad is negative, yet the momentum keeps its update
    positive: a Lion that took the sign of the grad (or of the updated momentum) fails."""
    lr, wd, b1, b2 = 0.1, 0.5, 0.9, 0.99
    start = [1.0, -2.0, 0.5]
    grads = [[1.0, -1.0, 0.0], [-0.05, 0.4, 2.0], [-0.05, 0.2, -0.1]]
    param = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = Lion([param], lr=lr, betas=(b1, b2), weight_decay=wd)
    p, m = list(start), [0.0, 0.0, 0.0]
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(3):
            c = b1 * m[i] + (1 - b1) * g[i]
            p[i] = p[i] * (1 - lr * wd) - lr * _sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g[i]
        torch.testing.assert_close(param.detach(), torch.tensor(p, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[param]["exp_avg"], torch.tensor(m, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_bad_betas_name_the_flag():
    with pytest.raises(ValueError, match="--lion-beta2"):
        Lion([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.5))


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(dtype)


@pytest.mark.parametrize("bf16", [False, True])
def test_megatron_optimizer_steps_lion_with_fp32_main_params(bf16):
    """--optimizer lion --lion-beta1/2 reach the torch optimizer; with --bf16 it steps the
    fp32 main params (as Adam does) and the checkpoint code finds its momentum."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = _model(dtype)
    config = OptimizerConfig(optimizer="lion", lr=0.01, weight_decay=0.1, lion_beta1=0.8, lion_beta2=0.9,
                             bf16=bf16, clip_grad=0.0)
    opt = get_megatron_optimizer(config, [model])
    assert isinstance(opt, Float16OptimizerWithFloat16Params if bf16 else FP32Optimizer)
    assert isinstance(opt.optimizer, Lion) and opt.optimizer.defaults["betas"] == (0.8, 0.9)
    weight = model[0].weight.detach().float().clone()
    model(torch.ones(2, 4, dtype=dtype)).sum().backward()
    grad = model[0].weight.grad.float().clone()
    if bf16:
        for p in model.parameters():
            p.main_grad = p.grad.float()
    ok, _, _ = opt.step()
    assert ok
    # first step: m = 0, so the update is exactly lr * sign(grad), after the decay
    expected = weight * (1 - 0.01 * 0.1) - 0.01 * grad.sign()
    torch.testing.assert_close(model[0].weight.detach().float(), expected, rtol=0, atol=1e-2 if bf16 else 1e-7)
    states, scalars = model_space_state(opt)
    assert scalars["has_state"] and set(states[model[0].weight]) >= {"exp_avg"}


def test_precision_aware_optimizer_refuses_lion():
    with pytest.raises(ValueError, match="--optimizer adam only"):
        OptimizerConfig(optimizer="lion", lr=0.1, use_precision_aware_optimizer=True, use_distributed_optimizer=True)
