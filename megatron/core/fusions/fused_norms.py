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


_layer_norm = CompiledRegion(layer_norm_reference, "layer_norm")
_rms_norm = CompiledRegion(rms_norm_reference, "rms_norm")


def fused_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, zero_centered_gamma: bool
) -> torch.Tensor:
    """Fused ``layer_norm_reference``: x [..., h], weight/bias [h] -> [..., h]."""
    return _layer_norm(x, weight, bias, eps, zero_centered_gamma)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """Fused ``rms_norm_reference``: x [..., h], weight [h] -> [..., h]."""
    return _rms_norm(x, weight, eps, zero_centered_gamma)
