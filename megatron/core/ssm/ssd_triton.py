"""The SSD chunked scan as our own Triton kernels, forward and backward, tied together by an
autograd.Function. Imported only where Triton is (``ssd.ssd_scan`` checks); the kernels and
their math are in ``ssd_triton_forward`` and ``ssd_triton_backward``.

Contract: that of ``ssd_reference.ssd_chunked`` (x [b, l, h, p], dt [b, l, h] after softplus,
A [h], B/C [b, l, g, n], D [h] or None, initial_states [b, h, p, n] or None), with
gradients for all of them. The chunk size must be a power of two from 16 to 256
(``supports`` says whether a shape can run). y and dx come back in x's dtype, the other
gradients in their input's dtype; everything in between is fp32.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from megatron.core.ssm.ssd_reference import _check_shapes
from megatron.core.ssm.ssd_triton_backward import dc_kernel, dt_kernel, dx_kernel, state_pass_bwd_kernel
from megatron.core.ssm.ssd_triton_forward import (
    chunk_cumsum_kernel,
    chunk_output_kernel,
    chunk_state_kernel,
    state_pass_fwd_kernel,
)

_STATE_BLOCK = 1024  # state entries per program in the sequential pass over chunks
_MAX_DIM = 256


# Largest [head, state] tile (padded) one program holds: the backward's dC kernel keeps the
# chunk's whole entering state next to its loop's tiles, and [128, 256] asks for 280 KiB of
# shared memory (an H100 has 227). Mamba-2 models use 64 x 128 or 128 x 128.
_MAX_STATE_TILE = 128 * 128


def supports(chunk_size: int, head_dim: int, state_dim: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernels take this shape: a power-of-two chunk of 16..256 positions
    (``tl.arange`` spans a chunk), head / state dims up to 256 whose padded product is at
    most 128 x 128 (one tile holds a head's state), x in bf16 or fp32 (the products' operand
    types)."""
    pow2 = chunk_size & (chunk_size - 1) == 0
    dims_fit = head_dim <= _MAX_DIM and state_dim <= _MAX_DIM and _pad16(head_dim) * _pad16(state_dim) <= _MAX_STATE_TILE
    return pow2 and 16 <= chunk_size <= 256 and dims_fit and dtype in (torch.bfloat16, torch.float32)


# The chunk length ``ssd.ssd_scan`` runs the kernels with whatever the configured one (the
# result does not depend on it; a shape ``supports`` at one chunk it supports at this one):
# 256-position chunks halve the chunk states the state passes stream through memory, and
# measured fastest on an H100 (docs/performance.md).
KERNEL_CHUNK = 256


def _block_q(chunk_size: int, state_dim: int) -> int:
    # Tiles of [block_q, state] and [block_q, head] live in registers; wide states take
    # shorter blocks to keep them there.
    return min(chunk_size, 32 if state_dim > 128 else 64)


# Programs the backward's dx / dC launches should have at least (several per SM of an
# H100's 132) before a program takes a whole group of heads.
_MIN_PROGRAMS = 1024


def _heads_per_program(s: "_Shape", blocks: int) -> int:
    """Heads one backward program walks, summing their dB / dC in registers: the whole group
    (the gradients come out summed, no per-head buffers) unless that leaves too few programs
    (few groups, e.g. one group per tensor-parallel rank), then the largest divisor of the
    group's heads that keeps ``_MIN_PROGRAMS`` (the launcher adds the slices)."""
    base = s.b * s.nc * blocks
    for hp in sorted((d for d in range(1, s.r + 1) if s.r % d == 0), reverse=True):
        if base * (s.h // hp) >= _MIN_PROGRAMS:
            return hp
    return 1


def _pad16(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _Shape:
    """Sizes and strides the launches share."""

    def __init__(self, x, dt, B, C, chunk_size: int, block_q: Optional[int], num_warps: int = 4,
                 num_stages: Optional[int] = None):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.r = self.h // self.g
        self.q = chunk_size
        self.nc = triton.cdiv(self.l, chunk_size)
        self.block_q = block_q or _block_q(chunk_size, self.n)
        self.block_p, self.block_n = _pad16(self.p), _pad16(self.n)
        # Triton's CPU interpreter multiplies bf16 tiles wrongly; there the products take
        # fp32 operands, so the tests still cover the bf16 loads, casts and stores.
        self.f32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
        self.sizes = (self.l, self.nc, self.h, self.r, self.p, self.n)
        self.strides = (*x.stride(), *B.stride(), *C.stride(), *dt.stride())
        # Four warps (the default) measured faster than eight at every chunk and tile of the
        # H100 sweep (benchmarks/ssd_sweep.py, docs/performance.md), [64, 128] tiles included.
        self.tiles = dict(BLOCK_Q=self.block_q, BLOCK_P=self.block_p, BLOCK_N=self.block_n, num_warps=num_warps)
        if num_stages is not None:  # else Triton's default pipelining depth
            self.tiles["num_stages"] = num_stages

    def chunk_grid(self, blocks: int):
        return (self.b * self.nc, self.h, blocks)

    def state_grid(self):
        return (self.b, self.h, triton.cdiv(self.p * self.n, _STATE_BLOCK))

    def buffer(self, device, *trailing):
        return torch.empty(self.b, self.h, self.nc, *trailing, device=device, dtype=torch.float32)


def _chunk_states(u, v, acum, dt, s: _Shape, from_output: bool) -> torch.Tensor:
    out = torch.empty(s.b, s.nc, s.h, s.p, s.n, device=u.device, dtype=torch.float32)
    block_p, block_n = min(s.block_p, 64), min(s.block_n, 64)
    blocks = triton.cdiv(s.p, block_p) * triton.cdiv(s.n, block_n)
    chunk_state_kernel[s.chunk_grid(blocks)](
        u, v, acum, dt, out, *s.sizes, *u.stride(), *v.stride(), *dt.stride(),
        Q=s.q, FROM_OUTPUT=from_output, F32=s.f32, BLOCK_Q=s.block_q, BLOCK_P=block_p, BLOCK_N=block_n)
    return out


def _entering_states(x, dt, A, B, initial_states, s: _Shape):
    """acum [b, h, c, Q], the states entering each chunk [b, c, h, P, N] and the final state."""
    acum = s.buffer(x.device, s.q)
    chunk_cumsum_kernel[(s.b * s.nc, s.h)](dt, A, acum, s.l, s.nc, s.h, *dt.stride(), Q=s.q)
    states = _chunk_states(x, B, acum, dt, s, from_output=False)
    final = torch.empty(s.b, s.h, s.p, s.n, device=x.device, dtype=torch.float32)
    init = initial_states.float().contiguous() if initial_states is not None else final
    state_pass_fwd_kernel[s.state_grid()](states, acum, init, final, s.nc, s.h, s.p * s.n, Q=s.q,
                                          HAS_INIT=initial_states is not None, BLOCK=_STATE_BLOCK)
    return acum, states, final


def _output(x, dt, A, B, C, D, acum, states, s: _Shape):
    y = torch.empty(s.b, s.l, s.h, s.p, device=x.device, dtype=x.dtype)
    chunk_output_kernel[s.chunk_grid(s.q // s.block_q)](
        x, B, C, dt, D if D is not None else A, acum, states, y, *s.sizes, *s.strides,
        Q=s.q, HAS_D=D is not None, F32=s.f32, **s.tiles)
    return y


def _backward(dy, dfinal, x, dt, A, B, C, D, acum, states, s: _Shape):
    dev = x.device
    ds_out = _chunk_states(dy, C, acum, dt, s, from_output=True)  # G[c], turned into dS_out[c] in place
    n_state_blocks = s.state_grid()[2]
    ds_last = s.buffer(dev, n_state_blocks)
    dinit = torch.empty(s.b, s.h, s.p, s.n, device=dev, dtype=torch.float32)
    state_pass_bwd_kernel[s.state_grid()](
        ds_out, states, acum, dfinal if dfinal is not None else dinit, dinit, ds_last, s.nc, s.h, s.p * s.n,
        n_state_blocks, Q=s.q, HAS_DFINAL=dfinal is not None, BLOCK=_STATE_BLOCK)
    ds, e, ddt_expl = s.buffer(dev, s.q), s.buffer(dev, s.q), s.buffer(dev, s.q)
    dx = torch.empty(s.b, s.l, s.h, s.p, device=dev, dtype=x.dtype)
    blocks = s.q // s.block_q
    hp = _heads_per_program(s, blocks)
    slices = s.h // hp  # programs per (chunk, block of positions); a group has r / hp of them
    whole_groups = hp == s.r
    dB = torch.empty(s.b, s.l, slices, s.n, device=dev, dtype=B.dtype if whole_groups else torch.float32)
    dC = torch.empty(s.b, s.l, slices, s.n, device=dev, dtype=C.dtype if whole_groups else torch.float32)
    grid = (s.b * s.nc, slices, blocks)
    dD_parts = s.buffer(dev, blocks) if D is not None else e
    dx_kernel[grid](x, B, C, dt, D if D is not None else A, dy, acum, ds_out, dx, dB, ds, e, ddt_expl,
                    dD_parts, *s.sizes, hp, *s.strides, Q=s.q, HAS_D=D is not None, F32=s.f32, **s.tiles)
    dc_kernel[grid](x, B, C, dt, dy, acum, states, dC, ds, *s.sizes, hp, *s.strides, Q=s.q, F32=s.f32,
                    **s.tiles)
    if not whole_groups:
        dB = dB.view(s.b, s.l, s.g, s.r // hp, s.n).sum(3).to(B.dtype)
        dC = dC.view(s.b, s.l, s.g, s.r // hp, s.n).sum(3).to(C.dtype)
    ddt = torch.empty(s.b, s.l, s.h, device=dev, dtype=dt.dtype)
    dA_parts = s.buffer(dev)
    dt_kernel[(s.b * s.nc, s.h)](dt, A, ds, e, ddt_expl, ds_last, ddt, dA_parts, s.l, s.nc, s.h, n_state_blocks,
                                 *dt.stride(), Q=s.q, BLOCK_BLK=max(2, triton.next_power_of_2(n_state_blocks)))
    dA = dA_parts.sum((0, 2)).to(A.dtype)
    dD = None if D is None else dD_parts.sum((0, 2, 3)).to(D.dtype)
    return dx, ddt, dA, dB, dC, dD, dinit


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, chunk_size, block_q, num_warps, num_stages, keep_states):
        s = _Shape(x, dt, B, C, chunk_size, block_q, num_warps, num_stages)
        acum, states, final = _entering_states(x, dt, A, B, initial_states, s)
        y = _output(x, dt, A, B, C, D, acum, states, s)
        # The entering states (fp32 [b, c, h, P, N]: x's bytes at state 128 and 256-position
        # tiles) are kept for backward unless keep_states is off, which recomputes them there
        # (the chunk cumsum, chunk states and the sequential state pass: a second forward pass
        # over the chunks) to save that memory.
        kept = (acum, states) if keep_states else (None, None)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_states, *kept)
        ctx.shape = s
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_states, acum, states = ctx.saved_tensors
        s = ctx.shape
        if states is None:
            acum, states, _ = _entering_states(x, dt, A, B, initial_states, s)
        if dy is None:
            dy = torch.zeros(s.b, s.l, s.h, s.p, device=x.device, dtype=x.dtype)
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dx, ddt, dA, dB, dC, dD, dinit = _backward(dy.contiguous(), dfinal, x, dt, A, B, C, D, acum, states, s)
        dinit = None if initial_states is None else dinit.to(initial_states.dtype)
        return dx, ddt, dA, dB, dC, dD, dinit, None, None, None, None, None


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    block_q: Optional[int] = None,
    num_warps: int = 4,
    num_stages: Optional[int] = None,
    keep_states: bool = True,
):
    """The scan on the Triton kernels; same contract as ``ssd_reference.ssd_chunked``.
    ``block_q`` (a power of two dividing the chunk, >= 16) overrides the tile length,
    ``num_warps`` and ``num_stages`` the warps and pipelining depth of the chunk kernels
    (tuning, ``benchmarks/ssd_sweep.py``). ``keep_states=False`` recomputes the chunks' entering
    states in backward instead of keeping them from forward: less memory, a slower backward."""
    _check_shapes(x, dt, A, B, C)
    if not supports(chunk_size, x.shape[-1], B.shape[-1], x.dtype):
        raise ValueError(f"SSD Triton kernels need a power-of-two chunk size in 16..256, head/state dims "
                         f"<= {_MAX_DIM} and x in bf16 or fp32; got chunk {chunk_size}, head dim {x.shape[-1]}, "
                         f"state {B.shape[-1]}, {x.dtype}: use the compile or reference SSD backend")
    if block_q is not None and (block_q < 16 or block_q & (block_q - 1) or chunk_size % block_q):
        raise ValueError(f"SSD Triton block_q must be a power of two >= 16 dividing the chunk size {chunk_size}, "
                         f"got {block_q}")
    y, final = _SSDScan.apply(x, dt, A, B, C, D, initial_states, chunk_size, block_q, num_warps,
                              num_stages, keep_states)
    return (y, final.to(x.dtype)) if return_final_states else y
