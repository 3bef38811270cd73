"""Which kernels torch's scaled_dot_product_attention may use on CUDA, in which order.

On Hopper the cuDNN attention kernel is much faster than flash attention for training
(head dim 128, long sequences), so it comes first: cuDNN, flash, memory-efficient, math.
SDPA takes the first backend in that order that supports the call. Grouped-query
attention is passed as ``enable_gqa=True`` so K/V are never repeated, unless cuDNN
accepts the call only with K/V repeated to the query heads (older cuDNN paths): then
repeating them is the price of the faster kernel, and this module says so.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

SDPA_BACKEND_PRIORITY = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
_logged: set = set()
_repeat_kv_decisions: dict = {}


def _log_once(key: str, message: str, *args) -> None:
    if key in _logged:
        return
    _logged.add(key)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message, *args)


def backend_order_names() -> str:
    """The CUDA backend order as text, e.g. 'cudnn, flash, efficient, math'."""
    names = {
        SDPBackend.CUDNN_ATTENTION: "cudnn",
        SDPBackend.FLASH_ATTENTION: "flash",
        SDPBackend.EFFICIENT_ATTENTION: "efficient",
        SDPBackend.MATH: "math",
    }
    return ", ".join(names[b] for b in SDPA_BACKEND_PRIORITY)


def sdpa_backend_priority(device: torch.device):
    """Context for one SDPA call: on CUDA, the backends in SDPA_BACKEND_PRIORITY order;
    elsewhere torch's own choice (a no-op context)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    _log_once("order", "attention: SDPA backend priority on CUDA: %s", backend_order_names())
    return sdpa_kernel(list(SDPA_BACKEND_PRIORITY), set_priority=True)


def _cudnn_accepts(q, k, v, mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, mask, dropout_p, is_causal, enable_gqa)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
    except (TypeError, RuntimeError):
        # an SDPAParams signature this torch does not have, or a build without cuDNN
        return False


def sdpa_attn_mask(masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's ``attn_mask`` for the project's bool mask (True = masked).

    A key-padding mask ([b, 1, 1, sk], BERT's) goes as an additive bias in the scores' dtype,
    0 where a key is seen and the dtype's lowest value where it is hidden, as Hugging Face
    BERT adds it: cuDNN serves that form faster than the bool one (at BERT-large's shape on
    an H100, forward+backward 0.544 against 0.675 ms with dropout, 0.434 against 0.505
    without: ``benchmarks/attention_mask_bench.py``, docs/performance.md). Any other mask
    goes as torch's bool form (True = attend), which stays exact for rows with every key
    hidden."""
    if masked.dim() == 4 and masked.shape[1] == 1 and masked.shape[2] == 1:
        bias = torch.zeros(masked.shape, dtype=dtype, device=masked.device)
        return bias.masked_fill_(masked, torch.finfo(dtype).min)
    return ~masked


def repeat_kv_for_cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout_p: float, is_causal: bool
) -> bool:
    """For grouped-query attention on CUDA (q [b, np, sq, hn], k/v [b, ng, sk, hn], np > ng):
    True when cuDNN refuses ``enable_gqa`` but takes K/V repeated to np heads. Decided once
    per shape, dtype and mask kind, and logged once."""
    if not q.is_cuda or q.shape[1] == k.shape[1]:
        return False
    mask_kind = None if mask is None else (tuple(mask.shape), mask.dtype)
    key = (tuple(q.shape), tuple(k.shape), q.dtype, mask_kind, dropout_p > 0, is_causal)
    decision = _repeat_kv_decisions.get(key)
    if decision is None and torch.compiler.is_compiling():
        # Asking cuDNN (a C++ object) would break the traced graph at every attention layer
        # (and recompile per layer); a shape first seen under tracing keeps enable_gqa.
        # Callers that compile run the step once eagerly first (the decode graph does).
        return False
    if decision is None:
        if _cudnn_accepts(q, k, v, mask, dropout_p, is_causal, True):
            decision = False
        else:
            repeated = q.new_empty((k.shape[0], q.shape[1], k.shape[2], k.shape[3]))
            decision = _cudnn_accepts(q, repeated, repeated, mask, dropout_p, is_causal, False)
        _repeat_kv_decisions[key] = decision
        _log_once(
            f"gqa{decision}",
            "attention: grouped-query attention %s",
            "repeats K/V to the query heads (cuDNN refuses enable_gqa here)" if decision else "uses SDPA enable_gqa",
        )
    return decision
