"""Depthwise causal conv1d (Mamba's short convolution): a pure-PyTorch reference and the
one capability check that picks the Triton kernels.

Output position t sees inputs t-k+1 .. t only (zeros before the start), so a token never
sees the future. Weight [channels, k], as the mixer's ``conv1d`` stores it with the
singleton input-channel dim dropped.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


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


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """CUDA and Triton: the Triton kernels can run."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _log_backend(fast: bool) -> None:
    logger.info("causal conv1d backend: %s", "Triton kernels" if fast else "pure-PyTorch reference (F.conv1d)")


def causal_conv1d(
    x_bld: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Channels-last entry the mixer calls: x [b, l, d] -> [b, l, d]; the Triton kernels on
    CUDA with Triton, else the reference."""
    fast = x_bld.is_cuda and triton_available()
    _log_backend(fast)
    if fast:
        from megatron.core.ssm.causal_conv1d_triton import causal_conv1d_triton

        if activation not in (None, "silu"):
            raise ValueError(f"causal conv1d activation must be None or 'silu', got {activation!r}")
        return causal_conv1d_triton(x_bld, weight, bias, activation)
    return causal_conv1d_reference(x_bld.transpose(1, 2), weight, bias, activation).transpose(1, 2)
