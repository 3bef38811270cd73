"""Fused bias-dropout-add equals the reference: the eval variant exactly the same math,
the training variant with the same random numbers when the compiler is told to use
torch's eager random ops (``fallback_random``), and dropout(p=0) as the identity.

Tolerance 1e-6: one fp32 add and multiply per element.
"""

import pytest
import torch

from megatron.core.fusions.fused_bias_dropout_add import bias_dropout_add_reference, get_bias_dropout_add

TOL = dict(atol=1e-6, rtol=1e-6)


def _inputs(with_bias=True, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 16, generator=gen).to(device, dtype).requires_grad_()
    bias = torch.randn(16, generator=gen).to(device, dtype).requires_grad_() if with_bias else None
    residual = torch.randn(4, 2, 16, generator=gen).to(device, dtype).requires_grad_()
    return x, bias, residual


def _run(fn, x, bias, residual, prob, seed=0):
    torch.manual_seed(seed)
    out = fn((x, bias), residual, prob)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    params = [t for t in (x, bias, residual) if t is not None]
    return [out.detach(), *torch.autograd.grad((out * weight).sum(), params)]


def _assert_same(fast, reference, **tol):
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, **(tol or TOL))


def test_inductor_eval_variant_matches_reference(compiled):
    x, b, r = _inputs()
    _assert_same(_run(get_bias_dropout_add(False, True), x, b, r, 0.3), _run(get_bias_dropout_add(False, False), x, b, r, 0.3))


def test_traced_training_variant_draws_torch_dropout_with_fallback_random(traced):
    import torch._inductor.config as inductor_config

    # torch's config patch, not monkeypatch: undoing a monkeypatch of a torch config module
    # can delete the key (its values live outside the module's __dict__).
    with inductor_config.patch(fallback_random=True):
        x, b, r = _inputs(with_bias=False)
        fast = _run(get_bias_dropout_add(True, True), x, b, r, 0.5)
        reference = _run(get_bias_dropout_add(True, False), x, b, r, 0.5)
        _assert_same(fast, reference)
        dropped = (fast[0] == r.detach()).float().mean()
        assert 0.3 < dropped < 0.7, f"dropout(0.5) dropped {dropped:.2f} of the elements"


def test_training_with_zero_prob_is_the_plain_sum():
    x, b, r = _inputs()
    out = get_bias_dropout_add(True, True)((x, b), r, 0.0)
    torch.testing.assert_close(out, r + x + b, **TOL)


def test_fp32_residual_keeps_the_sum_in_fp32():
    x, b, r = _inputs(dtype=torch.bfloat16)
    out = bias_dropout_add_reference(x, b, r.float(), 0.0, False)
    assert out.dtype == torch.float32


@pytest.mark.gpu
def test_bf16_cuda_fused_bias_dropout_add():
    x, b, r = _inputs(dtype=torch.bfloat16, device="cuda")
    fast = _run(get_bias_dropout_add(False, True), x, b, r, 0.1)
    _assert_same(fast, _run(get_bias_dropout_add(False, False), x, b, r, 0.1), atol=2e-2, rtol=2e-2)
    x = torch.ones(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = get_bias_dropout_add(True, True)((x, None), torch.zeros_like(x), 0.25)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01 and torch.allclose(out[out != 0].float(), torch.tensor(1 / 0.75, device="cuda"), rtol=1e-2)
