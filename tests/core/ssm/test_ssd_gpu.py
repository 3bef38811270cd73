"""The GPU backends of the SSD scan (our Triton kernels; torch.compile of the chunked scan)
against the eager reference, forward and backward, in bf16 inputs as training runs it.

Tolerance: both sides do fp32 math on the same bf16 inputs; the compiled scan fuses and
reorders the sums (~1e-6 relative in fp32), the Triton kernels also round the operands of
their products to bf16 (relative step 2^-8 ~ 4e-3, averaged over the sums), and the output
is rounded to bf16. 2e-2 absolute / 1.6e-2 relative (one or two bf16 steps on values of
order 1), and 2e-2 of each gradient's largest entry, pass that and fail any wrong term (a
missing decay or a mis-mapped group changes outputs by O(1)). fp32 inputs run the kernels'
products at IEEE fp32 precision: 1e-4 there.
"""

import pytest
import torch

from megatron.core.ssm import ssd
from megatron.core.ssm.ssd_reference import ssd_chunked

pytestmark = pytest.mark.gpu


def _inputs(b=2, l=1000, h=8, p=64, g=2, n=64, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(b, l, h, p, **kw).to(dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, **kw) - 3).to(torch.float32)
    A = -torch.rand(h, **kw) * 4 - 0.5
    B = (torch.randn(b, l, g, n, **kw) / n ** 0.5).to(dtype)
    C = (torch.randn(b, l, g, n, **kw) / n ** 0.5).to(dtype)
    D = torch.randn(h, **kw)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def _check_against_reference(inputs, chunk, backend, atol=2e-2, rtol=1.6e-2, grad_tol=2e-2):
    y = ssd.ssd_scan(*inputs[:5], chunk, inputs[5], backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    fast_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    x, dt, A, B, C, D = inputs
    y_ref = ssd_chunked(x.float(), dt, A, B.float(), C.float(), chunk, D).to(x.dtype)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name, fast, t in zip(("x", "dt", "A", "B", "C", "D"), fast_grads, inputs):
        scale = t.grad.float().abs().max().clamp(min=1.0)
        assert (fast.float() - t.grad.float()).abs().max() <= grad_tol * scale, name


def test_fast_path_is_selected_on_cuda(monkeypatch):
    assert ssd.fast_path_available()
    x, _, _, B, _, _ = _inputs(l=64)
    monkeypatch.delenv(ssd.BACKEND_ENV, raising=False)
    assert ssd.choose_backend(x, B, 128) == "triton"
    assert ssd.choose_backend(x, B, 100) == "compile"  # not a power of two: the kernels do not take it
    wide_x, _, _, wide_B, _, _ = _inputs(l=64, p=128, n=256)
    assert ssd.choose_backend(wide_x, wide_B, 128) == "compile"  # a [128, 256] state tile does not fit
    monkeypatch.setenv(ssd.BACKEND_ENV, "compile")
    assert ssd.choose_backend(x, B, 128) == "compile"


@pytest.mark.parametrize("chunk", [64, 128])
def test_compiled_scan_matches_reference_forward_and_backward(chunk):
    _check_against_reference(_inputs(), chunk, "compile")


@pytest.mark.parametrize("chunk,p,n,g", [(64, 64, 64, 2), (128, 64, 128, 8), (256, 32, 16, 1), (128, 128, 128, 4), (128, 64, 256, 4)])
def test_triton_kernels_match_reference_forward_and_backward(chunk, p, n, g):
    _check_against_reference(_inputs(h=8, p=p, g=g, n=n), chunk, "triton")


def test_triton_kernels_in_fp32():
    _check_against_reference(_inputs(l=300, dtype=torch.float32), 64, "triton", atol=1e-4, rtol=1e-4,
                             grad_tol=1e-4)


def test_triton_kernels_take_the_mixers_strided_views():
    b, l, h, p, g, n = 2, 333, 8, 64, 2, 64
    # One projection output split into views (strided over l), scaled so C . B is O(1).
    proj = (torch.randn(b, l, h * p + 2 * g * n, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    x = proj[..., :h * p].reshape(b, l, h, p)
    B = proj[..., h * p:h * p + g * n].reshape(b, l, g, n)
    C = proj[..., h * p + g * n:].reshape(b, l, g, n)
    assert not x.is_contiguous() and not B.is_contiguous()
    _, dt, A, _, _, D = _inputs(b=b, l=l, h=h, p=p, g=g, n=n)
    x, B, C = (t.detach().requires_grad_() for t in (x, B, C))
    _check_against_reference([x, dt, A, B, C, D], 128, "triton")


def test_triton_kernels_carry_initial_and_final_states():
    from megatron.core.ssm.ssd_triton import ssd_triton

    x, dt, A, B, C, D = _inputs(l=450, dtype=torch.float32)
    s0 = torch.randn(2, 8, 64, 64, device="cuda", requires_grad=True)
    ins = [x, dt, A, B, C, D, s0]
    weights = None
    results = []
    for scan in (ssd_triton, ssd_chunked):
        y, final = scan(x, dt, A, B, C, 128, D, s0, return_final_states=True)
        if weights is None:
            weights = (torch.randn_like(y), torch.randn_like(final))
        grads = torch.autograd.grad((y * weights[0]).sum() + (final * weights[1]).sum(), ins)
        results.append((y, final, *grads))
    for name, fast, ref in zip(("y", "final", "x", "dt", "A", "B", "C", "D", "s0"), *results):
        assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max().clamp(min=1.0), name
