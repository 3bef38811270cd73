"""A one-row matrix-vector product in Triton, the candidate against cuBLAS for batch-1 decoding.

At batch 1 every linear of a decode step is y = x W^T with x [1, K] and W [N, K]: a pure
stream of W's bytes. cuBLAS reads the llama-1.6b matrices at 1.3-2.0 TB/s inside a CUDA
graph (docs/performance.md, eighth round) against 3.35 TB/s on an H100, which bounds the
batch-1 step. Here each program reads ``block_n`` whole rows of W in ``block_k``-wide
strips and keeps one fp32 sum per row; ``block_n`` sets how many programs share the
matrix (N / block_n). ``generation_bench.py --gemv`` times it beside ``F.linear`` and
``torch.mv``; it is not used by the model until it measures faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :],
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int = 8, block_k: int = 512, num_warps: int = 4):
    """x [K] or [1, K], weight [N, K] (rows contiguous) -> x W^T, [N] or [1, N], in x's dtype."""
    if weight.stride(1) != 1:
        raise ValueError("gemv reads the weight's rows as contiguous: pass a row-major [N, K] matrix")
    flat = x.reshape(-1)
    n, k = weight.shape
    if flat.numel() != k:
        raise ValueError(f"gemv takes one row of {k} values, got x of shape {tuple(x.shape)}")
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](flat.contiguous(), weight, out, n, k, weight.stride(0),
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out.view(*x.shape[:-1], n)
