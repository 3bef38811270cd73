"""Mamba-2's gated RMSNorm: the compiled region equals the reference math (forward and the
grads of y, z and the weight) and keeps far fewer bytes for backward than the eager chain
of fp32 ops, which was the largest activation of a Mamba layer.

Tolerance 1e-5 in fp32: the compiled reduction sums in another order.
"""

import pytest
import torch

from megatron.core.fusions.fused_norms import fused_gated_rms_norm, gated_rms_norm_reference

TOL = dict(atol=1e-5, rtol=1e-5)
GROUPS, D = 4, 64


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    # z is a strided view of a wider projection, as in the mixer
    proj = torch.randn(2, 5, 3 * D, generator=g).to(dtype)
    y = (torch.randn(2, 5, D, generator=g) * 2).to(dtype)
    weight = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype)
    return y, proj, weight


def _run(fn, y, proj, weight):
    y, proj, weight = (t.detach().clone().requires_grad_() for t in (y, proj, weight))
    z = proj[..., D:2 * D]
    out = fn(y, z, weight, GROUPS, 1e-5)
    probe = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * probe).sum().backward()
    return [out.detach(), y.grad, proj.grad, weight.grad]


def _saved_bytes(fn, y, proj, weight) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    y, proj, weight = (t.detach().clone().requires_grad_() for t in (y, proj, weight))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(y, proj[..., D:2 * D], weight, GROUPS, 1e-5)
    return total


def test_compiled_gated_norm_matches_reference(compiled):
    inputs = _inputs()
    for got, want in zip(_run(fused_gated_rms_norm, *inputs), _run(gated_rms_norm_reference, *inputs)):
        torch.testing.assert_close(got, want, **TOL)


def test_compiled_gated_norm_keeps_fewer_bytes_for_backward(compiled):
    inputs = _inputs(torch.bfloat16)
    y = inputs[0]
    eager, fused = _saved_bytes(gated_rms_norm_reference, *inputs), _saved_bytes(fused_gated_rms_norm, *inputs)
    # eager keeps several fp32 copies of the input (> 5 x y's bytes); compiled about y, z
    # and the per-group scale
    assert eager > 5 * y.numel() * y.element_size()
    assert fused < eager / 2, (eager, fused)


def test_gated_norm_is_per_group():
    y, proj, weight = _inputs()
    z = proj[..., D:2 * D]
    out = gated_rms_norm_reference(y, z, torch.ones(D), GROUPS, 0.0)
    gated = (y * torch.nn.functional.silu(z)).view(2, 5, GROUPS, D // GROUPS)
    # every group of the output has unit mean square on its own
    torch.testing.assert_close(out.view_as(gated).pow(2).mean(-1), torch.ones(2, 5, GROUPS), **TOL)
    assert not torch.allclose(out, gated_rms_norm_reference(y, z, torch.ones(D), 1, 0.0))


@pytest.mark.gpu
def test_bf16_cuda_gated_norm_matches_reference():
    inputs = [t.cuda() for t in _inputs(torch.bfloat16)]
    for got, want in zip(_run(fused_gated_rms_norm, *inputs), _run(gated_rms_norm_reference, *inputs)):
        # bf16 output rounding (2^-8 relative) dominates
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
