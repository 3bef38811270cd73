"""Depthwise causal conv1d (Mamba's short convolution) in plain PyTorch.

Output position t sees inputs t-k+1 .. t only (zeros before the start), so a token never
sees the future. Layout [b, channels, l], weight [channels, k], as the mixer's ``conv1d``
stores it with the singleton input-channel dim dropped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """x [b, d, l], weight [d, k], bias [d] or None -> [b, d, l]; ``activation`` None or
    "silu" (applied after the bias)."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal conv1d activation must be None or 'silu', got {activation!r}")
    d, k = weight.shape
    if x.shape[1] != d:
        raise ValueError(f"causal conv1d: input has {x.shape[1]} channels, weight {d}")
    # Left padding only: output t is a combination of inputs t-k+1 .. t.
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None, :], bias, groups=d)
    return F.silu(out) if activation == "silu" else out
