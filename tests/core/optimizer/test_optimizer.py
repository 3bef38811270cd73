"""Megatron optimizers against plain torch optimizers on the same params and grads."""

import copy
import math

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron.core.transformer.transformer_config import TransformerConfig

TCFG = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).to(dtype)


def _reference_groups(model, wd):
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or p.dim() == 1)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or p.dim() == 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def _loss(model, x, y):
    return ((model(x.to(next(model.parameters()).dtype)).float() - y) ** 2).sum()


@pytest.mark.parametrize("clip_grad", [0.0, 0.5])
def test_fp32_optimizer_matches_torch_adamw(clip_grad):
    model = _model()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), model)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=clip_grad, adam_beta2=0.95)
    opt = get_megatron_optimizer(config, [ddp])
    assert isinstance(opt, FP32Optimizer)
    ref_opt = torch.optim.AdamW(_reference_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for x, y in _batches(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        _loss(ddp, x, y).backward()
        ddp.finish_grad_sync()
        ok, norm, zeros = opt.step()
        ref_opt.zero_grad()
        _loss(reference, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip_grad or math.inf)
        ref_opt.step()
        assert ok and zeros is None
        if clip_grad:
            # Same grads, sums in a different order: fp32 rounding only.
            assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
            assert norm > clip_grad  # the clipping path was exercised
        else:
            assert norm is None
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_keeps_fp32_master_weights():
    # With a fixed input the grads are constant, so every AdamW update is ~lr = 1e-3:
    # below half a bf16 ulp around 1.0 (2^-9 below, 2^-8 above), so a bf16-only
    # optimizer never moves the weights, while the fp32 master accumulates 5e-3.
    model = torch.nn.Linear(6, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    initial = model.weight.detach().clone()
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config = OptimizerConfig(lr=1e-3, weight_decay=0.0, bf16=True, clip_grad=0.0)
    opt = get_megatron_optimizer(config, [ddp])
    assert isinstance(opt, Float16OptimizerWithFloat16Params) and opt.grad_scaler is None
    main = opt.fp32_from_float16_groups[0][0]
    assert main.dtype == torch.float32 and main.shape == model.weight.shape
    master = initial.float().clone().requires_grad_()
    ref_opt = torch.optim.AdamW([master], lr=1e-3, weight_decay=0.0)
    bf16_only = initial.clone().requires_grad_()
    bf16_opt = torch.optim.AdamW([bf16_only], lr=1e-3, weight_decay=0.0)
    x = _batches(1)[0][0]
    for _ in range(5):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x.to(torch.bfloat16)).float().sum().backward()
        grad = model.weight.main_grad.clone()
        assert grad.dtype == torch.float32
        assert opt.step()[0]
        master.grad = grad
        ref_opt.step()
        bf16_only.grad = grad.to(torch.bfloat16)
        bf16_opt.step()
    torch.testing.assert_close(main, master.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(model.weight.detach(), master.detach().to(torch.bfloat16))
    assert torch.equal(bf16_only.detach(), initial)  # the test can tell the two apart
    assert not torch.equal(model.weight.detach(), initial)


def _set_fp16_grads(model, value):
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def test_fp16_dynamic_scaler_skips_on_inf_and_adapts():
    model = torch.nn.Linear(3, 2).to(torch.float16)
    config = OptimizerConfig(
        optimizer="sgd", sgd_momentum=0.0, lr=1.0, weight_decay=0.0, fp16=True, clip_grad=0.0,
        initial_loss_scale=2.0**8, loss_scale_window=3, hysteresis=2,
    )
    opt = get_megatron_optimizer(config, model)
    assert opt.get_loss_scale().item() == 256.0
    assert opt.scale_loss(torch.tensor(2.0)).item() == 512.0
    before = [p.detach().clone() for p in model.parameters()]
    for expected_scale in (256.0, 128.0):
        opt.zero_grad()
        _set_fp16_grads(model, float("inf"))
        assert opt.step() == (False, None, None)
        assert opt.get_loss_scale().item() == expected_scale
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)  # skipped step leaves the weights alone
    for step in range(3):
        opt.zero_grad()
        # scaled grad 64 at scale 128 -> unscaled 0.5 -> SGD(lr=1) subtracts 0.5
        _set_fp16_grads(model, 64.0)
        assert opt.step()[0]
        assert opt.get_loss_scale().item() == (256.0 if step == 2 else 128.0)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.float(), b.float() - 1.5, rtol=0, atol=2e-3)  # fp16 rounding of the cast


@pytest.mark.parametrize("bf16", [False, True])
def test_nan_grad_norm_skips_step(bf16):
    model = _model(torch.bfloat16 if bf16 else torch.float32)
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.1, bf16=bf16, clip_grad=1.0), model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad[0, 0] = float("nan")
    ok, norm, _ = opt.step()
    assert not ok and math.isnan(norm)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_log_num_zeros():
    model = torch.nn.Linear(4, 2)
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.1, log_num_zeros_in_grad=True), model)
    model.weight.grad = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]])
    model.bias.grad = torch.tensor([0.0, 1.0])
    assert opt.step()[2] == 4


def test_param_groups_follow_megatron_defaults():
    model = _model()
    model[2].weight.is_embedding_or_output_parameter = True
    config = OptimizerConfig(lr=1.0, min_lr=0.1, weight_decay=0.1, decoupled_lr=0.5, decoupled_min_lr=0.05)
    opt = get_megatron_optimizer(config, [model], scale_lr_cond=lambda n, p: n.startswith("0."), lr_mult=3.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    w0, b0, ln_w, ln_b, w2, b2 = model.parameters()
    assert by_param[id(w0)]["wd_mult"] == 1.0 and by_param[id(w0)]["lr_mult"] == 3.0
    assert by_param[id(b0)]["wd_mult"] == 0.0 and by_param[id(b0)]["lr_mult"] == 3.0
    assert by_param[id(ln_w)]["wd_mult"] == 0.0 and by_param[id(ln_b)]["weight_decay"] == 0.0
    assert by_param[id(w2)]["is_decoupled_lr"] and by_param[id(w2)]["max_lr"] == 0.5
    assert by_param[id(w2)]["min_lr"] == 0.05 and by_param[id(w2)]["lr"] == 0.5
    assert by_param[id(b2)]["lr"] == 1.0 and not by_param[id(b2)]["is_decoupled_lr"]
    assert isinstance(opt.optimizer, torch.optim.AdamW)


def test_rejections():
    with pytest.raises(ValueError, match="--use-distributed-optimizer needs every model chunk wrapped"):
        get_megatron_optimizer(OptimizerConfig(lr=1.0, use_distributed_optimizer=True), _model())
    with pytest.raises(ValueError, match="--lr"):
        get_megatron_optimizer(OptimizerConfig(), _model())
    with pytest.raises(ValueError, match="--optimizer"):
        OptimizerConfig(optimizer="lamb")
    assert isinstance(get_megatron_optimizer(OptimizerConfig(lr=1.0, optimizer="sgd"), _model()).optimizer, torch.optim.SGD)


def test_float16_state_dict_round_trip():
    def build():
        model = _model(torch.bfloat16)
        cfg = OptimizerConfig(lr=1e-2, bf16=True, loss_scale=4.0)
        return model, get_megatron_optimizer(cfg, model)

    def one_step(model, opt, x, y):
        opt.zero_grad()
        opt.scale_loss(_loss(model, x, y)).backward()
        return opt.step()

    (x1, y1), (x2, y2) = _batches(2)
    model_a, opt_a = build()
    one_step(model_a, opt_a, x1, y1)
    state = copy.deepcopy(opt_a.state_dict())
    assert set(state) == {"optimizer", "grad_scaler", "fp32_from_fp16_params"}
    model_b, opt_b = build()
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(state)
    one_step(model_a, opt_a, x2, y2)
    one_step(model_b, opt_b, x2, y2)
    for p, q in zip(opt_a.get_parameters(), opt_b.get_parameters()):
        assert torch.equal(p, q)


def test_skipped_zero_grad_does_not_double_count():
    # After an FP32Optimizer step, .grad aliases main_grad; a backward without
    # optimizer.zero_grad() must still leave exactly one micro-batch's grad in main_grad.
    model = torch.nn.Linear(3, 2)
    ddp = DistributedDataParallel(TCFG, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.0, clip_grad=0.0), ddp)
    x = torch.ones(1, 3)
    ddp(x).sum().backward()
    ddp.finish_grad_sync()
    opt.step()
    assert model.weight.grad is not None
    ddp.zero_grad_buffer()
    ddp(x).sum().backward()
    assert torch.equal(model.weight.main_grad, torch.ones(2, 3))
