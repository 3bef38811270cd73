"""``step_on_device()``: the optimizer step with no host sync equals ``step()`` bit for bit,
skips on a NaN/Inf grad norm as it does, and is refused where it cannot work."""

import math

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.device_step import DeviceStepResult, HostCopy
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.training.gpt_runs import fused_adamw_builder

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)


@pytest.fixture
def fused_adamw(monkeypatch):
    """torch's fused AdamW on CPU as on GPU (the factory keeps the unfused one on CPU)."""
    from megatron.core import optimizer

    monkeypatch.setattr(optimizer, "_torch_optimizer", fused_adamw_builder(optimizer._torch_optimizer))


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).to(dtype)


def _setup(dtype, clip_grad, distributed=False, zeros=False):
    model = _model(dtype)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed)
    ddp = DistributedDataParallel(TCFG, ddp_config, model)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=clip_grad, bf16=dtype == torch.bfloat16,
                             use_distributed_optimizer=distributed, log_num_zeros_in_grad=zeros)
    return ddp, get_megatron_optimizer(config, [ddp])


def _train(ddp, opt, on_device, steps=4, nan_at=None):
    g = torch.Generator().manual_seed(1)
    outcomes = []
    for step in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        dtype = next(ddp.parameters()).dtype
        loss = ((ddp(x.to(dtype)).float() - y) ** 2).sum() * (float("nan") if step == nan_at else 1.0)
        loss.backward()
        ddp.finish_grad_sync()
        if on_device:
            result = opt.step_on_device()
            outcomes.append(DeviceStepResult.as_host_triple(HostCopy(result.scalars()).values()))
        else:
            outcomes.append(opt.step())
    params = [p.detach().clone() for p in ddp.parameters()]
    return outcomes, params


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("dtype,distributed", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True)])
@pytest.mark.parametrize("clip_grad", [0.0, 0.05, 100.0])
def test_step_on_device_equals_step(fused_adamw, dtype, distributed, clip_grad):
    host_outcomes, host_params = _train(*_setup(dtype, clip_grad, distributed, zeros=True), on_device=False)
    ddp, opt = _setup(dtype, clip_grad, distributed, zeros=True)
    assert opt.can_step_on_device
    device_outcomes, device_params = _train(ddp, opt, on_device=True)
    assert device_outcomes == host_outcomes
    if clip_grad == 0.05:
        assert all(norm > clip_grad for _, norm, _ in host_outcomes)  # the clipping was exercised
    for p, q in zip(device_params, host_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_grad_norm_skips_the_step_on_the_device(fused_adamw, dtype):
    """A NaN loss at step 2: both paths skip it, leave weights and moments alone, and the
    steps after it give the same weights."""
    host_outcomes, host_params = _train(*_setup(dtype, 1.0), on_device=False, nan_at=1)
    ddp, opt = _setup(dtype, 1.0)
    device_outcomes, device_params = _train(ddp, opt, on_device=True, nan_at=1)
    assert [ok for ok, _, _ in device_outcomes] == [True, False, True, True]
    assert all(_same(a, b) for x, y in zip(device_outcomes, host_outcomes) for a, b in zip(x, y))
    for p, q in zip(device_params, host_params):
        assert torch.equal(p, q)
    steps = {float(state["step"]) for state in opt.optimizer.state.values()}
    assert steps == {3.0}  # the skipped step was not counted


def test_refused_where_the_step_needs_the_host(fused_adamw):
    model = torch.nn.Linear(3, 2)
    assert get_megatron_optimizer(OptimizerConfig(lr=0.1), model).can_step_on_device
    unfused = get_megatron_optimizer(OptimizerConfig(lr=0.1, optimizer="sgd"), torch.nn.Linear(3, 2))
    assert not unfused.can_step_on_device
    with pytest.raises(RuntimeError, match="cannot step on the device"):
        unfused.step_on_device()
    fp16 = get_megatron_optimizer(OptimizerConfig(lr=0.1, fp16=True), torch.nn.Linear(3, 2).half())
    assert not fp16.can_step_on_device  # the dynamic loss scaler reads found_inf on the host


def test_unfused_cpu_default_steps_on_the_host():
    assert not get_megatron_optimizer(OptimizerConfig(lr=0.1), torch.nn.Linear(3, 2)).can_step_on_device


def test_host_copy_of_cpu_values_and_names():
    copy = HostCopy({"loss:lm loss": torch.tensor(2.5), "grad_norm": torch.tensor([0.25])})
    values = copy.values()
    assert list(values) == ["loss:lm loss", "grad_norm"]
    assert float(values["loss:lm loss"]) == 2.5 and float(values["grad_norm"]) == 0.25
    assert HostCopy({}).values() == {}


def test_loss_scale_for_log_needs_no_device_read():
    assert get_megatron_optimizer(OptimizerConfig(lr=0.1), torch.nn.Linear(3, 2)).loss_scale_for_log() == 1.0
    fp16 = get_megatron_optimizer(OptimizerConfig(lr=0.1, fp16=True, initial_loss_scale=2.0**10),
                                  torch.nn.Linear(3, 2).half())
    assert fp16.loss_scale_for_log() == 1024.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_on_device_makes_no_host_sync():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda().bfloat16()
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True, clip_grad=1.0, log_num_zeros_in_grad=True),
                                 [ddp])
    assert opt.can_step_on_device
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the first step creates the optimizer state
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x).float().square().sum().backward()
        ddp.finish_grad_sync()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            copy = HostCopy(opt.step_on_device().scalars())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ok, norm, zeros = DeviceStepResult.as_host_triple(copy.values())
        assert ok and norm > 0 and zeros == 0
