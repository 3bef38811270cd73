"""The SSD scan the mixer calls, with one capability check for the fast path.

- CUDA tensors and Triton importable: the chunked scan compiled by ``torch.compile``
  (Inductor writes Triton kernels for the chunk products, the decay matrices and the
  state passing, forward and backward). This is the GPU path; it computes exactly the
  reference math and is tested against it (``tests/core/ssm/test_ssd_gpu.py``).
- Otherwise: the pure-PyTorch chunked reference (``ssd_reference.ssd_chunked``), eager.

The math runs in fp32 (fp64 stays fp64) and the result is cast back to x's dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Optional

import torch

from megatron.core.fusions.compiled_region import CompiledRegion
from megatron.core.ssm.ssd_reference import ssd_chunked

logger = logging.getLogger(__name__)


def _ssd_in_fp32(x, dt, A, B, C, D, chunk_size: int) -> torch.Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = ssd_chunked(x.to(compute), dt.to(compute), A.to(compute), B.to(compute), C.to(compute), chunk_size,
                    None if D is None else D.to(compute))
    return y.to(x.dtype)


_compiled_ssd = CompiledRegion(_ssd_in_fp32, "ssd_scan")


@functools.lru_cache(maxsize=None)
def fast_path_available() -> bool:
    """CUDA and Triton: the compiled scan can run."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _log_backend(fast: bool) -> None:
    logger.info("SSD scan backend: %s", "torch.compile of the chunked scan (Triton)" if fast
                else "pure-PyTorch chunked reference")


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
    -> y [b, l, h, p] in x's dtype."""
    fast = x.is_cuda and fast_path_available()
    _log_backend(fast)
    if fast:
        return _compiled_ssd(x, dt, A, B, C, D, chunk_size)
    return _ssd_in_fp32(x, dt, A, B, C, D, chunk_size)
