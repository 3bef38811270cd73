"""The FP8 linear's emulation path equals the quantize-dequantize reference math exactly
(forward, input gradient, weight gradient; FP8 and --no-fp8-wgrad), accumulates into an
fp32 main_grad, and is refused on CPU without the emulation opt-in."""

import pytest
import torch

from megatron.core.fp8.gemm import EMULATION, select_backend
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import fp8_max

S, B, K, N = 6, 2, 16, 24


def _randn(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _qdq(t, dtype):
    """Reference current-scaling quantize-dequantize: scale = fp8_max / amax."""
    scale = torch.tensor(fp8_max(dtype), dtype=torch.float32) / t.abs().amax().float()
    q = (t.float() * scale).clamp(-fp8_max(dtype), fp8_max(dtype)).to(dtype)
    return q.float() * scale.reciprocal()


def _run(recipe, fuse=False, main_grad=None):
    from megatron.core.fp8.scaling import Fp8Scaling

    scaling = Fp8Scaling(recipe)
    x = _randn(1, S, B, K).requires_grad_()
    w = _randn(2, N, K, scale=0.05).requires_grad_()
    if main_grad is not None:
        w.main_grad = main_grad
    g = _randn(3, S, B, N, scale=1e-3)
    y = fp8_linear(x, w, scaling, fuse_accumulation=fuse, backend=EMULATION)
    y.backward(g)
    return x, w, g, y, scaling


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_emulation_equals_reference_math(fmt):
    recipe = Fp8Recipe(fmt=fmt, recipe="tensorwise", emulation=True)
    x, w, g, y, _ = _run(recipe)
    gdt = recipe.grad_dtype
    x_dq = _qdq(x.detach().reshape(-1, K), torch.float8_e4m3fn)
    w_dq = _qdq(w.detach(), torch.float8_e4m3fn)
    g_dq = _qdq(g.reshape(-1, N), gdt)
    assert torch.equal(y.detach(), (x_dq @ w_dq.t()).view(S, B, N))
    assert torch.equal(x.grad, (g_dq @ w_dq).view(S, B, K))
    assert torch.equal(w.grad, g_dq.t() @ x_dq)
    # and FP8 is not a no-op: the result differs from the exact fp32 product
    assert not torch.equal(y.detach(), x.detach() @ w.detach().t())
    torch.testing.assert_close(y.detach(), x.detach() @ w.detach().t(), rtol=0.1, atol=0.05)


def test_no_fp8_wgrad_keeps_the_weight_gradient_in_high_precision():
    recipe = Fp8Recipe(recipe="tensorwise", wgrad=False, emulation=True)
    x, w, g, _, _ = _run(recipe)
    assert torch.equal(w.grad, g.reshape(-1, N).t() @ x.detach().reshape(-1, K))


def test_delayed_scaling_first_call_uses_scale_one_then_the_recorded_amax():
    recipe = Fp8Recipe(recipe="delayed", emulation=True)
    x, w, g, y, scaling = _run(recipe)
    x_q1 = x.detach().reshape(-1, K).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    w_q1 = w.detach().to(torch.float8_e4m3fn).float()
    assert torch.equal(y.detach(), (x_q1 @ w_q1.t()).view(S, B, N))
    assert scaling.scale[0].item() == pytest.approx(448 / x.detach().abs().max().item(), rel=1e-6)
    assert scaling.amax_history[0, 2].item() == pytest.approx(g.abs().max().item(), rel=1e-6)


def test_gradient_accumulation_fusion_adds_into_main_grad():
    recipe = Fp8Recipe(recipe="tensorwise", emulation=True)
    _, plain, _, _, _ = _run(recipe)
    start = torch.ones(N, K)
    _, fused, _, _, _ = _run(recipe, fuse=True, main_grad=start.clone())
    assert fused.grad_added_to_main_grad
    assert torch.equal(fused.main_grad, start + plain.grad)


def test_cpu_without_emulation_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA GPU with FP8 GEMMs.*--fp8-emulation"):
        select_backend(torch.device("cpu"), emulation=False)
    assert select_backend(torch.device("cpu"), emulation=True) == EMULATION


def test_scaled_mm_operands_and_scales_match_the_emulation_on_cpu():
    """torch._scaled_mm has a CPU kernel in recent torch: the operand layouts (row-major
    first, column-major second, transposed copies for dgrad and wgrad) and the scales
    (dequantization scales 1/scale) the FP8 GPU path passes are checked here against the
    emulation. Both accumulate the same FP8 products in fp32; only the summation order may
    differ, hence the tolerance of a few fp32 ulps of the outputs' size."""
    from megatron.core.fp8.gemm import SCALED_MM
    from megatron.core.fp8.scaling import Fp8Scaling

    probe = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU torch._scaled_mm")
    results = {}
    for backend in (SCALED_MM, EMULATION):
        x = _randn(1, 4, 8, 32).requires_grad_()
        w = _randn(2, 48, 32, scale=0.05).requires_grad_()
        y = fp8_linear(x, w, Fp8Scaling(Fp8Recipe(recipe="tensorwise")), backend=backend)
        y.backward(_randn(3, 4, 8, 48, scale=1e-3))
        results[backend] = (y.detach(), x.grad, w.grad)
    for name, a, b in zip(("y", "dx", "dw"), results[SCALED_MM], results[EMULATION]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")
