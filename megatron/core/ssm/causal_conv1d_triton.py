"""Depthwise causal conv1d (+ bias, + optional SiLU) as Triton kernels, channels last.

Imported only where Triton is (``causal_conv1d.causal_conv1d`` checks). Layout
x [b, l, d] with d contiguous (the in-projection's output, no transpose copy),
weight [d, k], bias [d]. With s = t - (k-1) + j:

  forward      pre[b, t, c] = bias[c] + sum_j w[c, j] * x[b, s, c]      (s >= 0)
               out = silu(pre) or pre
  backward     g = grad_out * silu'(pre)   (pre recomputed, not stored)
               grad_x[b, t, c] = sum_j w[c, j] * g[b, t + (k-1) - j, c]   (index < l)
               grad_w[c, j] = sum_{b,t} g[b, t, c] * x[b, t - (k-1) + j, c]; grad_bias = sum g

Every pass is a Triton kernel (one program per block of positions x channels, fp32
accumulation). x may be a strided view with contiguous channels (the in-projection's
slice: no copy); the output and gradients are contiguous. The weight and bias gradients,
reductions over b*l, are summed per block of positions next to g (k shifted products of
tiles already in cache) and the blocks' partial sums added up by one small reduction.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK_L, _BLOCK_D = 64, 64


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, D, sx_b, sx_l,
                     K: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, pid_l, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + pid_b * sx_b
    for j in tl.static_range(K):
        s = t - (K - 1) + j
        w = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        ok = ((s >= 0) & (s < L))[:, None] & c_ok[None, :]
        xv = tl.load(base + s[:, None] * sx_l + c[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += xv * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    ok = (t < L)[:, None] & c_ok[None, :]
    tl.store(out_ptr + (pid_b * L + t[:, None]) * D + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_grad_pre_kernel(x_ptr, w_ptr, b_ptr, gout_ptr, g_ptr, dw_ptr, db_ptr, L, D, sx_b, sx_l,
                          K: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """g = grad_out * d(out)/d(pre), fp32, recomputing pre; and this block's partial sums
    of the weight gradient (sum_t g[t] x[t-(k-1)+j] per tap j, [K, D]) and the bias's."""
    pid_b, pid_l, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    ok = (t < L)[:, None] & c_ok[None, :]
    offs = (pid_b * L + t[:, None]) * D + c[None, :]
    base = x_ptr + pid_b * sx_b
    g = tl.load(gout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        pre = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(K):
            s = t - (K - 1) + j
            w = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
            s_ok = ((s >= 0) & (s < L))[:, None] & c_ok[None, :]
            xv = tl.load(base + s[:, None] * sx_l + c[None, :], mask=s_ok, other=0.0).to(tl.float32)
            pre += xv * w[None, :]
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    tl.store(g_ptr + offs, g, mask=ok)
    # Partial sums of this block of positions, one row per (batch, block): [rows, K, D].
    row = pid_b * tl.num_programs(1) + pid_l
    for j in tl.static_range(K):
        s = t - (K - 1) + j
        s_ok = ((s >= 0) & (s < L))[:, None] & c_ok[None, :]
        xv = tl.load(base + s[:, None] * sx_l + c[None, :], mask=s_ok, other=0.0).to(tl.float32)
        tl.store(dw_ptr + (row * K + j) * D + c, tl.sum(g * xv, axis=0), mask=c_ok)
    if HAS_BIAS:
        tl.store(db_ptr + row * D + c, tl.sum(g, axis=0), mask=c_ok)


@triton.jit
def _conv_grad_x_kernel(g_ptr, w_ptr, gx_ptr, L, D,
                        K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, pid_l, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        u = t + (K - 1) - j
        w = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        ok = (u < L)[:, None] & c_ok[None, :]
        gv = tl.load(g_ptr + (pid_b * L + u[:, None]) * D + c[None, :], mask=ok, other=0.0)
        acc += gv * w[None, :]
    ok = (t < L)[:, None] & c_ok[None, :]
    tl.store(gx_ptr + (pid_b * L + t[:, None]) * D + c[None, :], acc.to(gx_ptr.dtype.element_ty), mask=ok)


def _grid(b: int, l: int, d: int):
    return (b, triton.cdiv(l, _BLOCK_L), triton.cdiv(d, _BLOCK_D))


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its channels are contiguous (a slice of a wider last dim is), else a copy."""
    return x if x.stride(2) == 1 else x.contiguous()


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        x, weight = _channels_contiguous(x), weight.contiguous()
        b, l, d = x.shape
        out = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
        _conv_fwd_kernel[_grid(b, l, d)](x, weight, bias if bias is not None else weight, out, l, d,
                                         x.stride(0), x.stride(1), K=weight.shape[1], SILU=silu,
                                         HAS_BIAS=bias is not None, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        b, l, d = x.shape
        k = weight.shape[1]
        grid = _grid(b, l, d)
        g = torch.empty(b, l, d, device=x.device, dtype=torch.float32)
        dw_parts = torch.empty(b * grid[1], k, d, device=x.device, dtype=torch.float32)
        db_parts = torch.empty(b * grid[1], d, device=x.device, dtype=torch.float32) if bias is not None else g
        _conv_grad_pre_kernel[grid](x, weight, bias if bias is not None else weight, grad_out, g, dw_parts, db_parts,
                                    l, d, x.stride(0), x.stride(1), K=k, SILU=ctx.silu, HAS_BIAS=bias is not None,
                                    BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D)
        grad_x = torch.empty(b, l, d, device=x.device, dtype=x.dtype)
        _conv_grad_x_kernel[grid](g, weight, grad_x, l, d, K=k, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D)
        grad_w = dw_parts.sum(0).t().to(weight.dtype)
        grad_bias = db_parts.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x, grad_w, grad_bias, None


def causal_conv1d_triton(x_bld: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         activation: Optional[str]) -> torch.Tensor:
    """x [b, l, d] (CUDA), weight [d, k], bias [d] or None -> [b, l, d]."""
    return _CausalConv1d.apply(x_bld, weight, bias, activation == "silu")
