"""The Triton kernel of ``grouped_wgrad``: every expert's weight gradient added into its
fp32 ``main_grad`` inside the GEMM.

For group g (the rows ``ends[g-1]:ends[g]`` of ``dy`` [T, N] and ``x`` [T, K]) one program
per [BLOCK_N, BLOCK_K] tile of the group's [N, K] gradient accumulates
``dy[rows]^T @ x[rows]`` in fp32 over the group's rows, then reads the tile of main_grad,
adds and writes it back: main_grad is read and written once per micro-batch, and the
half-precision gradient is never written. The groups' main_grads lie anywhere in one fp32
storage (the DDP gradient buffer): ``out_offsets[g]`` is group g's first element in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_wgrad_kernel(out_ptr, out_offsets_ptr, dy_ptr, x_ptr, ends_ptr, N, K, stride_dy, stride_x,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                          GROUP_N: tl.constexpr):
    g = tl.program_id(1)
    end = tl.load(ends_ptr + g).to(tl.int64)
    start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
    if end > start:  # an expert without tokens keeps its main_grad as it is
        # Tiles that share dy columns run together (GROUP_N rows of tiles at a time) for L2 reuse.
        pid = tl.program_id(0)
        tiles_n, tiles_k = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
        per_band = GROUP_N * tiles_k
        band = pid // per_band
        first_n = band * GROUP_N
        band_rows = tl.minimum(tiles_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_band) % band_rows
        pid_k = (pid % per_band) // band_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok, k_ok = offs_n < N, offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < end
            a = tl.load(dy_ptr + offs_t[None, :] * stride_dy + offs_n[:, None], mask=t_ok[None, :] & n_ok[:, None],
                        other=0.0)
            b = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc)
        base = tl.load(out_offsets_ptr + g)
        ptrs = out_ptr + base + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        mask = n_ok[:, None] & k_ok[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask) + acc, mask=mask)


def grouped_wgrad_accumulate(storage: torch.Tensor, out_offsets: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
                             ends: torch.Tensor, block_n: int = 128, block_k: int = 128, block_t: int = 64,
                             group_n: int = 8, num_warps: int = 8, num_stages: int = 3) -> None:
    """storage[out_offsets[g]:][:N*K] viewed [N, K] += dy[rows of g]^T @ x[rows of g] for every
    group g. ``storage`` fp32 (flat), ``out_offsets`` [G] int64, ``dy`` [T, N] and ``x`` [T, K]
    with unit last stride, ``ends`` [G] int32/int64 group ends (``ends[-1] <= T``)."""
    n, k = dy.size(1), x.size(1)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(k, block_k), ends.numel())
    _grouped_wgrad_kernel[grid](storage, out_offsets, dy, x, ends, n, k, dy.stride(0), x.stride(0),
                                BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_T=block_t, GROUP_N=group_n,
                                num_warps=num_warps, num_stages=num_stages)
