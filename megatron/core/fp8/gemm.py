"""The FP8 GEMM: ``torch._scaled_mm`` on GPUs with FP8, an fp32 emulation elsewhere.

``fp8_gemm_nt_dequant(a, 1 / a_scale, b, 1 / b_scale)`` computes ``(a / a_scale) @ (b / b_scale)^T`` for FP8
``a`` [M, K] and ``b`` [N, K] (any strides). ``torch._scaled_mm`` wants its first operand
row-major and its second column-major, every dimension a multiple of 16, and at most one
e5m2 operand; it multiplies by the *dequantization* scales ``1 / scale`` (float32 scalars)
and accumulates in fp32.

The emulation dequantizes both operands to float32 (``q * (1 / scale)``) and runs an fp32
matmul: it is exactly the reference math, and it runs anywhere, slowly. It is what the CPU
tests exercise; users opt in with ``--fp8-emulation`` (debugging the FP8 numerics without
an FP8 GPU). Without the opt-in, FP8 on a device without FP8 GEMMs is refused.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

SCALED_MM, EMULATION = "scaled_mm", "emulation"
_MIN_CAPABILITY = (8, 9)
_warned_shapes = set()


def select_backend(device: torch.device, emulation: bool) -> str:
    """``scaled_mm`` on a CUDA device with FP8 GEMMs (compute capability >= 8.9),
    ``emulation`` when asked for; otherwise raise ValueError saying why and what to do."""
    if emulation:
        return EMULATION
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= _MIN_CAPABILITY:
            return SCALED_MM
        raise ValueError(
            f"--fp8-format needs a GPU with FP8 GEMMs (compute capability 8.9 or higher, e.g. H100, L40S); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Train in bf16 "
            "(--bf16, drop the --fp8-* flags), or add --fp8-emulation to emulate FP8 in fp32 (slow; for debugging)"
        )
    raise ValueError(
        f"--fp8-format needs a CUDA GPU with FP8 GEMMs (compute capability 8.9 or higher); the model is on "
        f"{device.type}. Drop the --fp8-* flags, or add --fp8-emulation to emulate FP8 in fp32 "
        "(slow; for debugging the FP8 numerics on CPU)"
    )


def _scaled_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    dims = (a.size(0), a.size(1), b.size(0))
    if 0 in dims:
        return False  # nothing to multiply (an expert without tokens): the emulation's empty matmul
    if all(d % 16 == 0 for d in dims):
        return True
    if dims not in _warned_shapes:
        _warned_shapes.add(dims)
        logger.warning("FP8 GEMM of shape (M, K, N) = %s is not a multiple of 16: it runs in the fp32 "
                       "emulation (slow); pad the sizes to multiples of 16 for the FP8 GEMM", dims)
    return False


def fp8_gemm_nt_dequant(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
                        out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv)^T in ``out_dtype``; a [M, K], b [N, K] FP8, ``a_inv`` /
    ``b_inv`` the dequantization factors (1 / scale, float32 scalars)."""
    if backend == SCALED_MM and _scaled_mm_fits(a, b):
        return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)
    return (a.float() * a_inv).matmul((b.float() * b_inv).t()).to(out_dtype)
