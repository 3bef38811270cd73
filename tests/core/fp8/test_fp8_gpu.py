"""FP8 on an FP8 GPU (compute capability >= 8.9): the torch._scaled_mm path against the
fp32 emulation and against bf16. GPU only; CI skips these (the emulation is tested on CPU).

Tolerances. scaled_mm vs emulation: both multiply the same FP8 operands and apply the same
scales; they differ only in fp32 accumulation order and the bf16 rounding of the output, so
they agree to bf16 precision (rtol 1e-2 covers a bf16 ulp, 2^-8, with margin). FP8 vs bf16:
e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4 per operand) and e5m2 2 bits
(2^-3) for gradients; over K-long dot products of random operands the errors average out
to a few percent of the output's scale, so outputs and gradients are compared with a
relative-norm error bound of 10% (measured values are printed by the assertion message).
"""

import pytest
import torch

from megatron.core.fp8.gemm import EMULATION, SCALED_MM
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling

pytestmark = pytest.mark.gpu

S, B, K, N = 256, 2, 1024, 768


def _needs_fp8_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 (compute capability >= 8.9)")


def _tensors(dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(S, B, K, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(dtype)
    g = (torch.randn(S, B, N, device="cuda", generator=gen) * 1e-3).to(dtype)
    return x, w, g


def _run(backend, recipe, x, w, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = fp8_linear(x, w, Fp8Scaling(recipe, device=x.device), backend=backend)
    y.backward(g)
    return y.detach().float(), x.grad.float(), w.grad.float()


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_scaled_mm_equals_emulation(fmt):
    _needs_fp8_gpu()
    recipe = Fp8Recipe(fmt=fmt, recipe="tensorwise")
    x, w, g = _tensors()
    fast = _run(SCALED_MM, recipe, x, w, g)
    slow = _run(EMULATION, recipe, x, w, g)
    for name, a, b in zip(("y", "dx", "dw"), fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_linear_tracks_bf16(recipe):
    _needs_fp8_gpu()
    x, w, g = _tensors()
    scaling = Fp8Scaling(Fp8Recipe(recipe=recipe, amax_history_len=4, amax_compute_algo="max"), device="cuda")
    for _ in range(2):  # delayed scaling: the second call uses scales from the first
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, scaling, backend=SCALED_MM)
        y.backward(g)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    yb = torch.nn.functional.linear(xb, wb)
    yb.backward(g)
    for name, a, b in (("y", y, yb), ("dx", xr.grad, xb.grad), ("dw", wr.grad, wb.grad)):
        err = _rel_err(a.float(), b.float())
        assert err < 0.1, f"{name}: relative error {err:.4f} of FP8 against bf16"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_triton_casts_equal_eager(dtype):
    """The Triton cast does the same fp32 elementwise math: the same bits, saturation
    included (inputs up to 1e6 times the scale's range), row-major and transposed, on a
    shape that is no multiple of the tile; the Triton amax equals eager's, NaN included."""
    import megatron.core.fp8.scaling as scaling
    from megatron.core.fp8 import cast_triton

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(1000, 3000, device="cuda").to(torch.bfloat16) * 1000
    x[17, 33] = -3e5
    scale = torch.tensor(3.7, device="cuda")
    eager = scaling.quantize(x, scale, dtype).view(torch.uint8)
    q, q_t = cast_triton.cast(x, scale, dtype, transpose=True)
    assert torch.equal(q.view(torch.uint8), eager)
    assert torch.equal(q_t.view(torch.uint8), eager.t().contiguous())
    assert torch.equal(scaling.quantize_fused(x, scale, dtype).view(torch.uint8), eager)
    assert cast_triton.amax(x).item() == scaling.tensor_amax(x).item()
    x[999, 2999] = float("nan")
    assert torch.isnan(cast_triton.amax(x))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_triton_scaling_paths_equal_the_eager_scaling(monkeypatch, fmt, recipe):
    """The Triton paths (tensorwise: amax kernel, then the cast deriving the scale;
    delayed: one cast that takes the amax in its pass) give the same bits as the eager
    scale_for + cast path: output, both gradients and the recorded amax history and scales,
    over two micro-batches (weight cache reused under tensorwise)."""
    import megatron.core.fp8.scaling as scaling_module

    _needs_fp8_gpu()
    x, w, g = _tensors()
    results = []
    for triton_path in (True, False):
        monkeypatch.setattr(scaling_module, "_use_triton", lambda t, on=triton_path: on and t.is_cuda)
        scaling = Fp8Scaling(Fp8Recipe(fmt=fmt, recipe=recipe), device=torch.device("cuda"))
        weight = torch.nn.Parameter(w.clone())
        outs = []
        for step in range(2):
            xi = (x * (step + 1)).requires_grad_()
            y = fp8_linear(xi, weight, scaling, backend=SCALED_MM)
            y.backward(g)
            outs += [y.detach(), xi.grad]
        results.append((outs, weight.grad, scaling.amax_history.clone(), scaling.scale.clone()))
    (fast, fast_wg, fast_hist, fast_scale), (ref, ref_wg, ref_hist, ref_scale) = results
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    assert torch.equal(fast_wg, ref_wg)
    assert torch.equal(fast_hist, ref_hist) and torch.equal(fast_scale, ref_scale)
