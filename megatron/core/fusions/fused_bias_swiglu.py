"""bias + SwiGLU in one kernel: silu(gate) * up, where [gate; up] = x + bias."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.fusions.compiled_region import CompiledRegion


def bias_swiglu_reference(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., 2f] (+ bias [2f]) split into [gate; up] halves -> silu(gate) * up [..., f]."""
    if bias is not None:
        x = x + bias
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


_bias_swiglu = CompiledRegion(bias_swiglu_reference, "bias_swiglu")


def bias_swiglu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Fused SwiGLU with optional bias; same contract as ``bias_swiglu_reference``.

    Forward reads x once and writes the f-wide product; backward recomputes silu from the
    saved x instead of keeping silu(gate) alive.
    """
    return _bias_swiglu(x, bias)
