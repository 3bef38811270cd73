"""LayerNorm and RMSNorm math (fp32 inside, weight dtype out) as fused regions.

The modules in ``transformer/torch_norm.py`` own the parameters; these functions take
them as arguments so one compiled kernel (per norm kind) serves every layer. Fused, the
forward is one read of x and one write of the output, and the backward one kernel for
the input grad plus a reduction for the weight grads, instead of a chain of fp32 casts,
reductions and elementwise kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.fusions.compiled_region import CompiledRegion


def _gamma(weight: torch.Tensor, zero_centered_gamma: bool) -> torch.Tensor:
    return weight.float() + 1.0 if zero_centered_gamma else weight.float()


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, zero_centered_gamma: bool
) -> torch.Tensor:
    """LayerNorm over the last dim in fp32; output in the weight's dtype."""
    hidden = x.shape[-1]
    out = F.layer_norm(
        x.float(), (hidden,), _gamma(weight, zero_centered_gamma), None if bias is None else bias.float(), eps
    )
    return out.to(weight.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * gamma over the last dim in fp32; output in the weight's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * _gamma(weight, zero_centered_gamma)).to(weight.dtype)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                             eps: float) -> torch.Tensor:
    """Mamba-2's gated norm: weight * rmsnorm(y * silu(z)), the RMS taken over each of
    ``groups`` equal slices of the last dim. The gate comes before the norm, as in
    Megatron's and Hugging Face's Mamba-2 (``norm_before_gate=False``). Computed in fp32,
    cast to y's dtype, then scaled by the weight (Hugging Face's order)."""
    gated = y.float() * F.silu(z.float())
    shape = gated.shape
    grouped = gated.view(*shape[:-1], groups, shape[-1] // groups)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view(shape).to(y.dtype)


_layer_norm = CompiledRegion(layer_norm_reference, "layer_norm")
_rms_norm = CompiledRegion(rms_norm_reference, "rms_norm")
# Eager, the gated norm is a dozen fp32 kernels and keeps five fp32 copies of its input for
# backward (~22 bytes per element, the largest activation of a Mamba layer); compiled, it
# is one kernel each way and keeps y and z (z is a view of the in-projection's output).
_gated_rms_norm = CompiledRegion(gated_rms_norm_reference, "gated_rms_norm")


def fused_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, zero_centered_gamma: bool
) -> torch.Tensor:
    """Fused ``layer_norm_reference``: x [..., h], weight/bias [h] -> [..., h]."""
    return _layer_norm(x, weight, bias, eps, zero_centered_gamma)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """Fused ``rms_norm_reference``: x [..., h], weight [h] -> [..., h]."""
    return _rms_norm(x, weight, eps, zero_centered_gamma)


def fused_gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                         eps: float) -> torch.Tensor:
    """Fused ``gated_rms_norm_reference``: y, z [..., d], weight [d] -> [..., d]."""
    return _gated_rms_norm(y, z, weight, groups, eps)
