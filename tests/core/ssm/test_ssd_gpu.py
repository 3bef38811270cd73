"""The GPU path of the SSD scan (torch.compile of the chunked scan) against the eager
reference, forward and backward, in bf16 inputs as training runs it.

Tolerance: both sides do fp32 math on the same bf16 inputs; the compiled kernels fuse
and reorder the sums, which moves results by ~1e-6 relative in fp32, and the output is
rounded to bf16 (relative step 2^-8 ~ 4e-3). 2e-2 absolute / 1.6e-2 relative (one or
two bf16 steps on values of order 1) passes that and fails any wrong term (a missing
decay or a mis-mapped group changes outputs by O(1)).
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


def test_fast_path_is_selected_on_cuda():
    assert ssd.fast_path_available()


@pytest.mark.parametrize("chunk", [64, 128])
def test_compiled_scan_matches_reference_forward_and_backward(chunk):
    inputs = _inputs()
    y = ssd.ssd_scan(*inputs[:5], chunk, inputs[5])
    grad = torch.randn_like(y)
    y.backward(grad)
    fast_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    x, dt, A, B, C, D = inputs
    y_ref = ssd_chunked(x.float(), dt, A, B.float(), C.float(), chunk, D).to(x.dtype)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=1.6e-2)
    for name, fast, t in zip(("x", "dt", "A", "B", "C", "D"), fast_grads, inputs):
        scale = t.grad.float().abs().max().clamp(min=1.0)
        assert (fast.float() - t.grad.float()).abs().max() <= 2e-2 * scale, name
