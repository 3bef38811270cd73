"""The optimizers on CUDA (fused AdamW, scaler and flags on the device)."""

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)


@pytest.mark.gpu
def test_bf16_fused_adamw_on_cuda_matches_fp32_reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).cuda().to(torch.bfloat16)
    master = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-2, bf16=True, weight_decay=0.0, clip_grad=1.0), [ddp])
    assert opt.optimizer.defaults.get("fused")
    ref = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.0)
    for step in range(3):
        x = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x).float().pow(2).sum().backward()
        grads = [p.main_grad.clone() for p in model.parameters()]
        ok, norm, _ = opt.step()
        assert ok
        total = torch.stack([g.norm() for g in grads]).norm()
        coeff = min(1.0, 1.0 / (total.item() + 1e-6))
        for m, g in zip(master, grads):
            m.grad = g * coeff
        ref.step()
        assert norm == pytest.approx(total.item(), rel=1e-5)
    # fused and for-loop AdamW differ by fp32 rounding only.
    for m, p in zip(master, model.parameters()):
        torch.testing.assert_close(p.main_param, m.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), p.main_param.to(torch.bfloat16))


@pytest.mark.gpu
def test_fp16_overflow_skips_on_cuda():
    model = torch.nn.Linear(4, 4).cuda().half()
    cfg = OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=2.0**16, hysteresis=1, clip_grad=1.0)
    opt = get_megatron_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.scale_loss(model(torch.full((2, 4), 6e4, device="cuda", dtype=torch.half)).float().sum())
    loss.backward()
    assert opt.step() == (False, None, None)
    assert opt.get_loss_scale().item() == 2.0**15
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()
    opt.scale_loss(model(torch.ones(1, 4, device="cuda", dtype=torch.half)).float().sum()).backward()
    assert opt.step()[0]
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
