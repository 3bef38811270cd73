"""The SSD scan the mixer calls, with one capability check choosing its backend.

- ``triton`` (the CUDA default): our own Triton kernels of the chunked scan, forward and
  backward (``ssd_triton``), for head / state dims up to 256; they run chunks of
  ``ssd_triton.KERNEL_CHUNK`` positions whatever ``chunk_size`` says (a speed choice: the
  result does not depend on it); another shape on CUDA takes ``compile``.
- ``compile``: the chunked reference compiled by ``torch.compile`` (Inductor writes Triton
  kernels for the chunk products, the decay matrices and the state passing).
- ``reference``: the pure-PyTorch chunked reference (``ssd_reference.ssd_chunked``), eager;
  the only backend without CUDA and Triton.

On CUDA the environment variable ``MEGATRON_SSD_BACKEND`` (or ``ssd_scan``'s ``backend``
argument) picks one of them, so both fast paths stay
selectable and can be measured against each other (``benchmarks/mamba_bench.py``). All
backends compute the same math in fp32 (fp64 stays fp64 on the reference) and return y in
x's dtype; they are tested against the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Optional

import torch

from megatron.core.fusions.compiled_region import CompiledRegion
from megatron.core.ssm.ssd_reference import ssd_chunked

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "compile", "reference")
BACKEND_ENV = "MEGATRON_SSD_BACKEND"


def _ssd_in_fp32(x, dt, A, B, C, D, chunk_size: int) -> torch.Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = ssd_chunked(x.to(compute), dt.to(compute), A.to(compute), B.to(compute), C.to(compute), chunk_size,
                    None if D is None else D.to(compute))
    return y.to(x.dtype)


_compiled_ssd = CompiledRegion(_ssd_in_fp32, "ssd_scan")


@functools.lru_cache(maxsize=None)
def fast_path_available() -> bool:
    """CUDA and Triton: the Triton kernels and the compiled scan can run."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _log_backend(backend: str, why: str = "") -> None:
    names = {"triton": "Triton SSD kernels", "compile": "torch.compile of the chunked scan (Triton)",
             "reference": "pure-PyTorch chunked reference"}
    logger.info("SSD scan backend: %s%s", names[backend], f" ({why})" if why else "")


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """``backend`` if given, else ``$MEGATRON_SSD_BACKEND`` (unset or empty: None)."""
    source = "the ssd backend argument"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "").strip().lower() or None, BACKEND_ENV
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source} is {backend!r}; choose one of {', '.join(BACKENDS)} (or leave it unset)")
    return backend


def choose_backend(x: torch.Tensor, B: torch.Tensor, chunk_size: int, backend: Optional[str] = None) -> str:
    """The backend ``ssd_scan`` runs for these inputs: the request on CUDA with Triton,
    ``triton`` when nothing is requested, ``compile`` for a shape or dtype the kernels do
    not take or inside an outer ``torch.compile``, ``reference`` without CUDA and Triton."""
    wanted = requested_backend(backend)
    if not (x.is_cuda and fast_path_available()):
        return "reference"
    if wanted in ("compile", "reference"):
        return wanted
    if torch.compiler.is_compiling():
        # Inside a model-wide torch.compile the chunked math traces into the outer graph
        # (``compile`` runs its eager body there); the kernels would split that graph.
        return "compile"
    from megatron.core.ssm.ssd_triton import supports

    if supports(chunk_size, x.shape[-1], B.shape[-1], x.dtype):
        return "triton"
    _log_backend("compile", f"the Triton kernels do not take chunk {chunk_size}, head dim {x.shape[-1]}, "
                            f"state {B.shape[-1]}, {x.dtype}")
    return "compile"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """x [b, l, h, p], dt [b, l, h] (after softplus), A [h], B/C [b, l, g, n], D [h]
    -> y [b, l, h, p] in x's dtype. ``backend``: one of ``BACKENDS`` or None (the
    environment's choice, else the default)."""
    chosen = choose_backend(x, B, chunk_size, backend)
    _log_backend(chosen)
    if chosen == "triton":
        from megatron.core.ssm.ssd_triton import KERNEL_CHUNK, ssd_triton

        return ssd_triton(x, dt, A, B, C, KERNEL_CHUNK, D)
    if chosen == "compile":
        return _compiled_ssd(x, dt, A, B, C, D, chunk_size)
    return _ssd_in_fp32(x, dt, A, B, C, D, chunk_size)
