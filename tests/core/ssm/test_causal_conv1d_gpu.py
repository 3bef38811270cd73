"""The Triton causal conv1d against the reference on CUDA, forward and backward (x, weight,
bias), with and without SiLU, in fp32 and bf16.

Tolerance: both accumulate in fp32; fp32 results differ only by summation order (~1e-6).
bf16 outputs are rounded to bf16 (relative step 2^-8), so 1e-2 relative covers one step;
weight/bias gradients sum b*l products in fp32 on both sides (the reference through
cuDNN), ~1e-5 relative apart, compared after scaling by their magnitude.
"""

import pytest
import torch

from megatron.core.ssm.causal_conv1d import causal_conv1d, causal_conv1d_reference, triton_available

pytestmark = pytest.mark.gpu


def test_triton_path_is_selected_on_cuda():
    assert triton_available()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("b,l,d,k", [(2, 1000, 96, 4), (1, 37, 200, 3), (3, 129, 64, 4)])
def test_triton_matches_reference(b, l, d, k, activation, dtype, tol):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, l, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(d, k, device="cuda", generator=gen) / k).to(dtype).requires_grad_()
    bias = torch.randn(d, device="cuda", generator=gen).to(dtype).requires_grad_()
    out = causal_conv1d(x, w, bias, activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    fast = [t.grad.clone() for t in (x, w, bias)]
    for t in (x, w, bias):
        t.grad = None
    ref = causal_conv1d_reference(x.float().transpose(1, 2), w.float(), bias.float(), activation).transpose(1, 2)
    ref.backward(grad.float())
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for name, got, t in zip(("x", "weight", "bias"), fast, (x, w, bias)):
        scale = t.grad.float().abs().max().clamp(min=1.0)
        assert (got.float() - t.grad.float()).abs().max() <= 2 * tol * scale, name


def test_strided_channel_slice_matches_contiguous():
    """The mixer passes a channel slice of the batch-transposed in-projection output: the
    kernels read it in place and must give what a contiguous copy gives, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(300, 3, 200, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(96, 4, device="cuda", generator=gen) / 4).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(96, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(3, 300, 96, device="cuda", generator=gen).to(torch.bfloat16)
    results = []
    for copy in (False, True):
        x = wide.transpose(0, 1)[..., 50:146]
        out = causal_conv1d(x.contiguous() if copy else x, w, bias, "silu")
        out.backward(grad)
        results.append([out.detach().clone()] + [t.grad.clone() for t in (wide, w, bias)])
        for t in (wide, w, bias):
            t.grad = None
    for got, want in zip(*results):
        assert torch.equal(got, want)
