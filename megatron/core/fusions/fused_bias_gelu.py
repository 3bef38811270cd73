"""bias + GeLU in one kernel: gelu(x + bias), exact (erf) or tanh-approximated."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.fusions.compiled_region import CompiledRegion


def bias_gelu_reference(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) in eager PyTorch; ``approximate`` is "none" (erf) or "tanh"."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


_bias_gelu = CompiledRegion(bias_gelu_reference, "bias_gelu")


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none") -> torch.Tensor:
    """Fused gelu(x + bias): x [..., f], bias [f] or None -> [..., f] in x's dtype.

    Backward saves only x (and bias) and recomputes the GeLU derivative in one kernel.
    """
    return _bias_gelu(x, bias, approximate)
