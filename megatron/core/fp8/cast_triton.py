"""Triton kernels for the FP8 casts of the linears: the absolute maximum, and the cast
with its transposed copy in one pass.

Both are memory-bound passes over a bf16/fp32 tensor; written by hand because the
compiled equivalents measured far below memory bandwidth on an H100 (a dynamic-shape
reduction to one scalar ran at ~130 GB/s, the transposed cast at ~420 GB/s).

- ``amax(x)``: each program reduces one block of the flattened tensor and folds its
  maximum into a float32 scalar with an atomic max (|x| >= 0, so the float ordering is
  the integer ordering the atomic uses). NaN propagates: a block holding a NaN writes NaN.
- ``cast(x, scale, dtype, transpose)``: each program reads a [BLOCK_M, BLOCK_N] tile of
  the 2-D ``x`` once, computes ``clamp(x * scale, -max, max)`` in fp32, casts it to the
  FP8 dtype (round to nearest even, like ``Tensor.to``) and stores it row-major and, when
  asked, transposed ([N, M] row-major), so ``torch._scaled_mm``'s second operand needs no
  separate transposed copy.
- ``cast_current_scaling``: the cast that derives the scale from an amax taken before it
  (``tensorwise``); ``cast_delayed_scaling``: the cast with the scale the state holds
  (``delayed``), which takes the tensor's amax in the same pass, so the delayed recipe reads
  each operand once.
- ``advance_delayed``: the delayed recipe's state update after that cast (the amax into the
  history, the next scale from the history's window, the history's roll) in one launch of
  one program: the same update in torch is about a dozen kernels of a few microseconds, and
  a step casts thousands of operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}
_LIMITS = {dtype: float(torch.finfo(dtype).max) for dtype in _FP8}


@triton.jit
def _amax_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    block_max = tl.max(tl.abs(x), axis=0)
    # tl.max drops NaN; keep it, so a NaN input gives a NaN amax (the NaN check sees it)
    has_nan = tl.max((x != x).to(tl.int32), axis=0) > 0
    block_max = tl.where(has_nan, float("nan"), block_max)
    tl.atomic_max(out_ptr, block_max)


@triton.jit
def _cast_kernel(x_ptr, scale_ptr, q_ptr, qt_ptr, M, N, limit, margin_factor, scale_out_ptr, scale_inv_out_ptr,
                 history_ptr, state_scale_ptr, amax_out_ptr, FP8: tl.constexpr, TRANSPOSE: tl.constexpr,
                 FROM_AMAX: tl.constexpr, TAKE_AMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if FROM_AMAX:
        # current scaling: scale = (limit / amax) / 2^margin, 1 where amax is 0 or not finite
        # (scaling.compute_scale's rule), IEEE-rounded divisions as torch's
        amax = tl.load(scale_ptr)
        usable = (amax > 0.0) & (amax < float("inf"))
        scale = tl.where(usable, tl.math.div_rn(tl.math.div_rn(limit, amax), margin_factor), 1.0)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(scale_out_ptr, scale)
            tl.store(scale_inv_out_ptr, tl.math.div_rn(1.0, scale))
            tl.store(history_ptr, amax)
            tl.store(state_scale_ptr, scale)
    else:
        scale = tl.load(scale_ptr)
    if TAKE_AMAX:
        # delayed scaling: this tensor's amax, for the history, from the pass that casts it;
        # and the scale used, copied out before the state's scale moves on
        block_max = tl.max(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1), axis=0)
        has_nan = tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0) > 0
        tl.atomic_max(amax_out_ptr, tl.where(has_nan, float("nan"), block_max))
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(scale_out_ptr, scale)
            tl.store(scale_inv_out_ptr, tl.math.div_rn(1.0, scale))
    q = tl.clamp(x * scale, -limit, limit).to(FP8)
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], q, mask=mask)
    if TRANSPOSE:
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar tensor (NaN if x holds a NaN)."""
    x = x.detach().contiguous()
    out = torch.zeros((), dtype=torch.float32, device=x.device)
    if x.numel():
        block = 8192
        _amax_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out


def cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """(q [M, N], q^T [N, M] or None) for a 2-D ``x``; see the module docstring."""
    x = x.detach().contiguous()
    m, n = x.shape
    q = torch.empty((m, n), dtype=dtype, device=x.device)
    q_t = torch.empty((n, m), dtype=dtype, device=x.device) if transpose else None
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    scale = scale.float().reshape(1)
    _cast_kernel[grid](x, scale, q, q_t if transpose else q, m, n, _LIMITS[dtype], 1.0, scale, scale, scale, scale,
                       scale, FP8=_FP8[dtype], TRANSPOSE=transpose, FROM_AMAX=False, TAKE_AMAX=False, BLOCK_M=64,
                       BLOCK_N=64, num_warps=4)
    return q, q_t


def _scaled_outputs(x: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """(contiguous x, q, q^T or None, scale, scale_inv) allocated for a cast that writes its
    scale: each scalar its own allocation (cuBLASLt refuses a scale pointer that is not
    16-byte aligned)."""
    x = x.detach().contiguous()
    m, n = x.shape
    q = torch.empty((m, n), dtype=dtype, device=x.device)
    q_t = torch.empty((n, m), dtype=dtype, device=x.device) if transpose else None
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    scale_inv = torch.empty((), dtype=torch.float32, device=x.device)
    return x, q, q_t, scale, scale_inv


def cast_current_scaling(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, margin: int, transpose: bool,
                         amax_history_slot: torch.Tensor, scale_slot: torch.Tensor):
    """Tensorwise (current) scaling in one launch after the amax: the cast kernel computes
    the scale from ``amax`` itself and records the amax and the scale in the scaling state
    (``amax_history_slot`` / ``scale_slot``: one-element views of its buffers).

    Returns (q, q^T or None, scale, scale_inv): new float32 scalars, the scale and its
    reciprocal (the dequantization factor ``torch._scaled_mm`` takes). Each is its own
    allocation: cuBLASLt refuses a scale pointer that is not 16-byte aligned."""
    x, q, q_t, scale, scale_inv = _scaled_outputs(x, dtype, transpose)
    m, n = x.shape
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _cast_kernel[grid](x, amax, q, q_t if transpose else q, m, n, _LIMITS[dtype], float(2 ** margin), scale,
                       scale_inv, amax_history_slot, scale_slot, scale, FP8=_FP8[dtype], TRANSPOSE=transpose,
                       FROM_AMAX=True, TAKE_AMAX=False, BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return q, q_t, scale, scale_inv


def cast_delayed_scaling(x: torch.Tensor, scale_slot: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """Delayed scaling in one launch: the cast with the state's scale (``scale_slot``, a
    one-element view) that also takes the amax of ``x`` (NaN if ``x`` holds one).

    Returns (q, q^T or None, scale, scale_inv, amax): new float32 scalars, the scale used (a
    copy: the caller moves the state's scale on afterwards), its reciprocal, and the amax
    for the history. Each scalar is its own allocation (cuBLASLt wants 16-byte aligned scale
    pointers)."""
    x, q, q_t, scale, scale_inv = _scaled_outputs(x, dtype, transpose)
    m, n = x.shape
    amax_out = torch.zeros((), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _cast_kernel[grid](x, scale_slot, q, q_t if transpose else q, m, n, _LIMITS[dtype], 1.0, scale, scale_inv,
                       scale, scale, amax_out, FP8=_FP8[dtype], TRANSPOSE=transpose, FROM_AMAX=False, TAKE_AMAX=True,
                       BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return q, q_t, scale, scale_inv, amax_out


@triton.jit
def _advance_delayed_kernel(history_ptr, stride, scale_ptr, amax_ptr, length, limit, margin_factor,
                            USE_MAX: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    valid = idx < length
    amax = tl.load(amax_ptr)
    # history[0] = amax, then the window: the history's max (NaN if it holds one: tl.max
    # drops NaN) or the newest amax
    window_values = tl.where(idx == 0, amax, tl.load(history_ptr + idx * stride, mask=valid, other=0.0))
    if USE_MAX:
        window = tl.max(tl.where(valid, window_values, float("-inf")), axis=0)
        has_nan = tl.max(((window_values != window_values) & valid).to(tl.int32), axis=0) > 0
        window = tl.where(has_nan, float("nan"), window)
    else:
        window = amax
    # scaling.compute_scale: (limit / window) / 2^margin, the previous scale where the window
    # is 0 or not finite; IEEE-rounded divisions as torch's
    previous = tl.load(scale_ptr)
    usable = (window > 0.0) & (window < float("inf"))
    scale = tl.where(usable, tl.math.div_rn(tl.math.div_rn(limit, window), margin_factor), previous)
    # the roll (newest first): [0, amax, history[1], ..., history[L-2]]; one entry keeps the amax
    older = tl.load(history_ptr + (idx - 1) * stride, mask=valid & (idx >= 2), other=0.0)
    rolled = tl.where(idx == 1, amax, older)
    rolled = tl.where(idx == 0, tl.where(length == 1, amax, 0.0), rolled)
    tl.debug_barrier()  # every lane has read the history before any lane writes it
    tl.store(history_ptr + idx * stride, rolled, mask=valid)
    tl.store(scale_ptr, scale)


def advance_delayed(history: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, fmt_max: float, margin: int,
                    use_max: bool) -> None:
    """``scaling.advance_scales`` for one slot under ``delayed``, in place, in one launch:
    ``history`` [L] (a column view of the amax history, newest first), ``scale`` (a
    one-element view of the state's scale) and this call's ``amax`` (a float32 scalar)."""
    length = history.numel()
    _advance_delayed_kernel[(1,)](history, history.stride(0), scale, amax, length, fmt_max, float(2 ** margin),
                                  USE_MAX=use_max, BLOCK=max(triton.next_power_of_2(length), 2), num_warps=1)
