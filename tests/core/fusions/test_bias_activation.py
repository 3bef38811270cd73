"""bias + GeLU and bias + SwiGLU: the fused (compiled) path equals the reference, forward
and backward, and the dispatcher picks the fused kernels for the activations they cover.

Tolerance: fp32 elementwise math whose compiled form may reorder or contract operations
(e.g. an FMA), so results differ by a few ulps; 1e-6 absolute on O(1) values.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.fusions import fused_bias_activation
from megatron.core.fusions.fused_bias_activation import bias_activation, bias_activation_reference
from megatron.core.fusions.fused_bias_gelu import bias_gelu, bias_gelu_reference
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu, bias_swiglu_reference
from megatron.core.transformer.activations import openai_gelu, quick_gelu

TOL = dict(atol=1e-6, rtol=1e-6)


def _inputs(width, bias=True, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, width, generator=gen).to(device, dtype).requires_grad_()
    b = torch.randn(width, generator=gen).to(device, dtype).requires_grad_() if bias else None
    return x, b


def _value_and_grads(fn, x, b):
    out = fn(x, b)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    params = [x] + ([b] if b is not None else [])
    grads = torch.autograd.grad((out * weight).sum(), params)
    return [out.detach(), *grads]


def _assert_same(fast, reference, **tol):
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, **(tol or TOL))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_gelu_matches_torch_formula(approximate):
    x, b = _inputs(8)
    want = F.gelu(x + b, approximate=approximate)
    torch.testing.assert_close(bias_gelu_reference(x, b, approximate), want, **TOL)


def test_reference_swiglu_splits_gate_then_up():
    x, b = _inputs(8)
    y = x + b
    torch.testing.assert_close(bias_swiglu_reference(x, b), F.silu(y[..., :4]) * y[..., 4:], **TOL)


def _check_gelu(approximate, with_bias):
    x, b = _inputs(16, with_bias)
    fast = _value_and_grads(lambda x, b: bias_gelu(x, b, approximate), x, b)
    reference = _value_and_grads(lambda x, b: bias_gelu_reference(x, b, approximate), x, b)
    _assert_same(fast, reference)


def test_inductor_bias_gelu_matches_reference(compiled):
    _check_gelu("tanh", True)


@pytest.mark.parametrize("approximate, with_bias", [("none", True), ("none", False), ("tanh", False)])
def test_traced_bias_gelu_variants_match_reference(traced, approximate, with_bias):
    _check_gelu(approximate, with_bias)


def test_inductor_bias_swiglu_matches_reference(compiled):
    x, b = _inputs(16, True)
    _assert_same(_value_and_grads(bias_swiglu, x, b), _value_and_grads(bias_swiglu_reference, x, b))


def test_traced_swiglu_without_bias_matches_reference(traced):
    x, b = _inputs(16, False)
    _assert_same(_value_and_grads(bias_swiglu, x, b), _value_and_grads(bias_swiglu_reference, x, b))


@pytest.mark.parametrize(
    "activation, gated, kernel",
    [(openai_gelu, False, "bias_gelu"), (F.silu, True, "bias_swiglu")],
)
def test_dispatch_uses_fused_kernel_when_switched_on(monkeypatch, activation, gated, kernel):
    calls = []
    original = getattr(fused_bias_activation, kernel)
    monkeypatch.setattr(fused_bias_activation, kernel, lambda *a: calls.append(a) or original(*a))
    x, b = _inputs(8)
    off = bias_activation(x, b, activation, gated, fused=False)
    assert calls == []
    on = bias_activation(x, b, activation, gated, fused=True)
    assert len(calls) == 1
    torch.testing.assert_close(on, off, **TOL)


@pytest.mark.parametrize("gated", [False, True])
def test_fused_gelu_is_megatrons_tanh_approximation(gated):
    """Megatron's fused bias-GeLU / bias-GeGLU compute the tanh approximation; exact GeLU
    (erf) is what the unfused path computes. A Megatron-LM checkpoint trained with the
    default --bias-gelu-fusion gives other outputs under exact GeLU (about 1e-3 apart)."""
    x, b = _inputs(8)
    y = x + b
    if gated:
        gate, up = y.chunk(2, dim=-1)
        tanh, erf = F.gelu(gate, approximate="tanh") * up, F.gelu(gate) * up
    else:
        tanh, erf = F.gelu(y, approximate="tanh"), F.gelu(y)
    torch.testing.assert_close(bias_activation(x, b, F.gelu, gated, fused=True), tanh, **TOL)
    torch.testing.assert_close(bias_activation(x, b, F.gelu, gated, fused=False), erf, **TOL)
    assert not torch.allclose(tanh, erf, atol=1e-6, rtol=0)


def test_dispatch_falls_back_for_activations_without_a_kernel():
    x, b = _inputs(8)
    got = bias_activation(x, b, quick_gelu, True, fused=True)
    torch.testing.assert_close(got, bias_activation_reference(x, b, quick_gelu, True), **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gelu", "tanh", "swiglu"])
def test_bf16_cuda_fused_activation_matches_reference(kind):
    x, b = _inputs(1024, dtype=torch.bfloat16, device="cuda")
    if kind == "swiglu":
        fast, ref = bias_swiglu, bias_swiglu_reference
    else:
        approximate = "none" if kind == "gelu" else "tanh"
        fast = lambda x, b: bias_gelu(x, b, approximate)  # noqa: E731
        ref = lambda x, b: bias_gelu_reference(x, b, approximate)  # noqa: E731
    # bf16 keeps 8 mantissa bits; the fused kernel rounds once instead of after each op
    _assert_same(_value_and_grads(fast, x, b), _value_and_grads(ref, x, b), atol=2e-2, rtol=2e-2)
