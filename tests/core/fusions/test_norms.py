"""Fused LayerNorm / RMSNorm equal the reference math (forward, input and weight grads),
and the norm modules keep their parameters and attributes.

Tolerance 1e-5: fp32 reductions over the hidden dim whose compiled form sums in another
order.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.torch_norm import LayerNorm, RMSNorm, build_norm
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-5, rtol=1e-5)
H = 32


def _pair(cls, zero_centered, dtype=torch.float32, device="cpu"):
    """(fused, reference) modules with the same random weights."""
    fused = cls(H, eps=1e-5, zero_centered_gamma=zero_centered, params_dtype=dtype, fused=True).to(device)
    reference = cls(H, eps=1e-5, zero_centered_gamma=zero_centered, params_dtype=dtype, fused=False).to(device)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0.0, 0.5)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _run(module, x):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * weight).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


def _check(cls, zero_centered, **tol):
    fused, reference = _pair(cls, zero_centered)
    x = torch.randn(4, 2, H, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for got, want in zip(_run(fused, x), _run(reference, x)):
        torch.testing.assert_close(got, want, **(tol or TOL))


def test_inductor_rms_norm_matches_reference(compiled):
    _check(RMSNorm, zero_centered=True)


def test_inductor_layer_norm_matches_reference(compiled):
    _check(LayerNorm, zero_centered=False)


@pytest.mark.parametrize("cls, zero_centered", [(RMSNorm, False), (LayerNorm, True)])
def test_traced_norm_variants_match_reference(traced, cls, zero_centered):
    _check(cls, zero_centered)


def test_reference_layer_norm_is_torch_layer_norm():
    _, reference = _pair(LayerNorm, False)
    x = torch.randn(3, H)
    torch.testing.assert_close(reference(x), F.layer_norm(x, (H,), reference.weight, reference.bias, 1e-5), **TOL)


def test_build_norm_follows_persist_layer_norm_and_keeps_parameters():
    on = build_norm(TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2), H)
    off = build_norm(
        TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, persist_layer_norm=False), H
    )
    assert on.fused and not off.fused
    assert list(on.state_dict()) == ["weight", "bias"] == list(off.state_dict())
    assert on.eps == off.eps and on.hidden_size == H and on.weight.sequence_parallel is False


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_bf16_cuda_fused_norm_matches_reference(cls):
    fused, reference = _pair(cls, False, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(64, 2, H, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(_run(fused, x), _run(reference, x)):
        # bf16 output rounding (2^-8 relative) dominates; weight grads sum 128 rows of it
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
