"""Ring-attention blocks on PyTorch's fused flash-attention kernels, which return the
row log-sum-exp that the ring's merge needs (block_math has the plain fp32 math).

A block of the ring is split into pieces the kernels can take without an explicit mask:
a (query segment, key segment) pair that is fully visible runs unmasked, the diagonal
pair of a segment with itself runs with the kernel's causal mask, hidden pairs are
skipped. A block with any other pattern (a sliding window cutting through it) returns no
pieces and runs on block_math. Pieces merge by log-sum-exp exactly as whole blocks do.

The backward hands each piece the final output and log-sum-exp of its rows: the flash
backward then recomputes the globally normalized probabilities of that piece, so the
pieces' dQ, dK and dV add up to the exact gradients (the ring-flash-attention scheme).

Kernels: ``_scaled_dot_product_flash_attention`` and its backward on CUDA (fp16/bf16,
head dim a multiple of 8 up to 256), ``_scaled_dot_product_flash_attention_for_cpu``
on CPU (used by the tests; the ring keeps block_math on CPU). Grouped K/V are repeated
to the query heads for the kernel and their gradients summed back over each group.
No dropout: with dropout the ring runs on block_math.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron.core.transformer.context_parallel.block_math import BlockPlan, pair_state

Span = Tuple[int, int]
# (query spans, key spans, causal): one kernel call
Piece = Tuple[List[Span], List[Span], bool]


def supported(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether the ring can run its blocks on the CUDA flash kernels."""
    head_dim = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
            and head_dim % 8 == 0 and head_dim <= 256)


def pieces(plan: BlockPlan, causal: bool, window) -> Optional[List[Piece]]:
    """The kernel calls that make up a planned block, or None when it needs an explicit mask."""
    if not plan.masked:
        return [(plan.rows, plan.cols, False)]
    if window is not None or not causal:
        return None
    out: List[Piece] = []
    for q_seg, q_span in zip(plan.row_segments, plan.rows):
        for k_seg, k_span in zip(plan.col_segments, plan.cols):
            state = pair_state(q_seg, k_seg, float("inf"), 0)  # causal, no window
            if state == "full":
                out.append(([q_span], [k_span], False))
            elif state == "partial":
                if q_seg != k_seg:
                    return None
                out.append(([q_span], [k_span], True))
    return out


def _heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] -> [b, ng * g, s, hn] each."""
    b, ng, g, sq, hn = q.shape
    sk = k.shape[3]
    return (q.reshape(b, ng * g, sq, hn), k.expand(b, ng, g, sk, hn).reshape(b, ng * g, sk, hn),
            v.expand(b, ng, g, sk, hn).reshape(b, ng * g, sk, hn))


def forward(q, k, v, scale: float, causal: bool):
    """q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] (one dtype) -> (out like q, normalized
    within the piece; lse [b, ng, g, sq] fp32)."""
    q4, k4, v4 = _heads(q, k, v)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, scale=scale)
    return out.view(q.shape), lse.view(q.shape[:-1])


def backward(q, k, v, out, dout, lse, scale: float, causal: bool):
    """Gradients of one piece given the final out, dout (like q) and lse (fp32) of its rows:
    dq [b, ng, g, sq, hn] in q's dtype, dk / dv [b, ng, 1, sk, hn] in fp32 (summed over the
    query heads of each group)."""
    b, ng, g, sq, hn = q.shape
    sk = k.shape[3]
    q4, k4, v4 = _heads(q, k, v)
    out4, dout4 = out.reshape(q4.shape), dout.reshape(q4.shape)
    lse3 = lse.reshape(b, ng * g, sq).contiguous()
    if q.is_cuda:
        # The rng state only matters with dropout, which the kernel path does not take.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout4, q4, k4, v4, out4, lse3, None, None, sq, sk, 0.0, causal, seed, offset, scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout4, q4, k4, v4, out4, lse3, 0.0, causal, scale=scale)
    dk = dk.view(b, ng, g, sk, hn).float().sum(dim=2, keepdim=True)
    dv = dv.view(b, ng, g, sk, hn).float().sum(dim=2, keepdim=True)
    return dq.view(q.shape), dk, dv
