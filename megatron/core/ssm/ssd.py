"""The SSD scan the mixer calls: one entry point, one backend today.

The pure-PyTorch chunked scan (``ssd_reference.ssd_chunked``) runs everywhere. A fused GPU
kernel is not part of this package yet; when one is added it is chosen here, behind one
capability check, and tested against the reference.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron.core.ssm.ssd_reference import ssd_chunked

logger = logging.getLogger(__name__)
_LOGGED = False


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [b, l, h, p], dt [b, l, h] (after softplus), A [h], B/C [b, l, g, n], D [h]
    -> y [b, l, h, p], computed in fp32 and returned in x's dtype."""
    global _LOGGED
    if not _LOGGED:
        logger.info("SSD scan backend: pure-PyTorch chunked reference")
        _LOGGED = True
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = ssd_chunked(x.to(compute), dt.to(compute), A.to(compute), B.to(compute), C.to(compute), chunk_size,
                    None if D is None else D.to(compute))
    return y.to(x.dtype)
