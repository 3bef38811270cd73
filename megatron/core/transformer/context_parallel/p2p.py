"""Ring attention (--cp-comm-type p2p): K/V travel around the context-parallel ring.

Each of the n ring members holds its queries and one K/V block. In n steps every member
sees every K/V block; the next block's send/receive is started before the current block
is computed, so communication overlaps compute. Partial results merge by log-sum-exp
(block_math). Blocks that the causal mask (or a sliding window) hides entirely are
skipped; with the load-balanced split (layout.py) a rank computes, per step after the
first, either all its queries against the first half of the block, or its second half
of queries against the whole block, with no mask: equal work on every rank.

The backward is exact and local to the ring: K/V go around again, each block's
probabilities are recomputed from the saved log-sum-exp, and the block's dK/dV
accumulator travels with it, arriving home after the last step.

Blocks run on the fused flash-attention kernels (block_kernels) on CUDA in fp16/bf16
without dropout; otherwise, and for blocks a sliding window cuts through, on the plain
fp32 math of block_math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core.fake_backend import receive_buffer
from megatron.core.transformer.context_parallel import block_kernels, block_math
from megatron.core.transformer.context_parallel.layout import Segment


@dataclass
class Ring:
    """A ring of ``members`` (global ranks, in ring order) inside ``group``.

    ``segments[i]``: the global-position segments of member i's tokens (its queries and
    its K/V block). ``index``: this process's position in ``members``."""

    group: object
    members: List[int]
    index: int
    segments: List[List[Segment]]

    @property
    def size(self) -> int:
        return len(self.members)


def ring_send_recv_start(tensor: torch.Tensor, ring: Ring):
    """Start sending ``tensor`` to the next ring member and receiving the previous one's.

    Forward only (used inside autograd Functions, which route gradients themselves).
    Returns (receive buffer, requests); call ring_send_recv_wait to finish."""
    tensor = tensor.contiguous()
    recv = receive_buffer(tensor.shape, tensor.dtype, tensor.device, ring.group)
    nxt = ring.members[(ring.index + 1) % ring.size]
    prv = ring.members[(ring.index - 1) % ring.size]
    ops = [
        dist.P2POp(dist.isend, tensor, nxt, ring.group),
        dist.P2POp(dist.irecv, recv, prv, ring.group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def ring_send_recv_wait(pending) -> torch.Tensor:
    """Wait for a ring_send_recv_start exchange; return the received tensor."""
    recv, requests = pending
    for request in requests:
        request.wait()
    return recv


def ring_shift(tensor: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Send ``tensor`` to the next member and return the previous member's (blocking)."""
    return ring_send_recv_wait(ring_send_recv_start(tensor, ring))


class RingAttentionFunction(torch.autograd.Function):
    """Exact attention of local queries against all ring members' K/V.

    forward(q [b, ng, g, sq, hn], k, v [b, ng, 1, sk, hn], ring, causal, window, scale,
    dropout_p) -> out [b, ng, g, sq, hn] (q's dtype). Backward: dq, dk, dv for this
    member's tensors (dk/dv gathered from every member that used them, via the ring).
    Dropout masks come from a seed drawn from the current device RNG (the caller forks the
    tensor-parallel stream) and are redrawn per block in backward."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, causal: bool, window, scale: float, dropout_p: float = 0.0,
                use_kernels: bool = False):
        seed = int(torch.randint(0, 1 << 62, (1,), device=q.device).item()) if dropout_p > 0.0 else None
        # out / lse start at the first result: step 0 is the rank's own block, in which
        # every query sees at least itself, so there always is one.
        q32 = out = lse = None
        seq_len = q.shape[3]
        kv = torch.stack([k, v])
        mine = ring.segments[ring.index]
        for step in range(ring.size):
            pending = ring_send_recv_start(kv, ring) if step < ring.size - 1 else None
            origin = (ring.index - step) % ring.size
            plan = block_math.plan_block(mine, ring.segments[origin], causal, window)
            kernel_pieces = block_kernels.pieces(plan, causal, window) if use_kernels and plan is not None else None
            if kernel_pieces is not None:
                for rows, cols, piece_causal in kernel_pieces:
                    o, l = block_kernels.forward(block_math.take(q, rows, 3), block_math.take(kv[0], cols, 3),
                                                 block_math.take(kv[1], cols, 3), scale, piece_causal)
                    out, lse = block_math.accumulate(out, lse, o, l, rows, seq_len)
            elif plan is not None:
                q32 = q.float() if q32 is None else q32
                mask = block_math.plan_mask(plan, causal, window, q.device)
                k_blk = block_math.take(kv[0].float(), plan.cols, 3)
                v_blk = block_math.take(kv[1].float(), plan.cols, 3)
                dropout = _block_dropout(dropout_p, seed, origin)
                o, l = block_math.block_forward(block_math.take(q32, plan.rows, 3), k_blk, v_blk, scale, mask, dropout)
                out, lse = block_math.accumulate(out, lse, o, l, plan.rows, seq_len)
            if pending is not None:
                kv = ring_send_recv_wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.window, ctx.scale = ring, causal, window, scale
        ctx.dropout_p, ctx.seed, ctx.use_kernels = dropout_p, seed, use_kernels
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, causal, window, scale = ctx.ring, ctx.causal, ctx.window, ctx.scale
        dout = dout.contiguous()
        q32 = dout32 = delta = None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        mine = ring.segments[ring.index]
        for step in range(ring.size):
            last = step == ring.size - 1
            pending = None if last else ring_send_recv_start(kv, ring)
            origin = (ring.index - step) % ring.size
            plan = block_math.plan_block(mine, ring.segments[origin], causal, window)
            kernel_pieces = block_kernels.pieces(plan, causal, window) if ctx.use_kernels and plan is not None else None
            if kernel_pieces is not None:
                for rows, cols, piece_causal in kernel_pieces:
                    q_p, out_p, do_p, lse_p = (block_math.take(t, rows, 3) for t in (q, out, dout, lse))
                    dq_p, dk_p, dv_p = block_kernels.backward(
                        q_p, block_math.take(kv[0], cols, 3), block_math.take(kv[1], cols, 3), out_p, do_p, lse_p,
                        scale, piece_causal)
                    block_math.add_into(dq, rows, dq_p.float(), 3)
                    block_math.add_into(dkv[0], cols, dk_p, 3)
                    block_math.add_into(dkv[1], cols, dv_p, 3)
            elif plan is not None:
                if q32 is None:
                    q32, dout32 = q.float(), dout.float()
                    delta = (dout32 * out.float()).sum(dim=-1)
                mask = block_math.plan_mask(plan, causal, window, q.device)
                q_b, do_b, lse_b, delta_b = (block_math.take(t, plan.rows, 3) for t in (q32, dout32, lse, delta))
                k_b, v_b = (block_math.take(t.float(), plan.cols, 3) for t in (kv[0], kv[1]))
                dropout = _block_dropout(ctx.dropout_p, ctx.seed, origin)
                dq_b, dk_b, dv_b = block_math.block_backward(q_b, k_b, v_b, do_b, lse_b, delta_b, scale, mask, dropout)
                block_math.add_into(dq, plan.rows, dq_b, 3)
                block_math.add_into(dkv[0], plan.cols, dk_b, 3)
                block_math.add_into(dkv[1], plan.cols, dv_b, 3)
            # The block's gradient travels on with it; after the last step one more
            # shift brings every block's gradient back to its owner.
            dkv = ring_shift(dkv, ring) if ring.size > 1 else dkv
            if pending is not None:
                kv = ring_send_recv_wait(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def _block_dropout(dropout_p: float, seed, origin: int):
    """(p, seed of the block from ring member ``origin``), or None without dropout."""
    return None if seed is None else (dropout_p, seed + 7919 * origin)


def ring_attention(q, k, v, ring: Ring, causal: bool, window, scale: float, dropout_p: float = 0.0,
                   use_kernels: Optional[bool] = None) -> torch.Tensor:
    """Grouped q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] -> out like q (see RingAttentionFunction).

    ``use_kernels``: run the blocks on the flash kernels (block_kernels); None picks them
    where block_kernels.supported says they apply."""
    if use_kernels is None:
        use_kernels = block_kernels.supported(q, dropout_p)
    return RingAttentionFunction.apply(q, k, v, ring, causal, window, scale, dropout_p, use_kernels)

