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

Kernels on CUDA (fp16/bf16, head dim a multiple of 8 up to 256): cuDNN's fused attention
(``_scaled_dot_product_cudnn_attention`` with its log-sum-exp) on Hopper and newer at head
dims up to 128, where it ran the ring's blocks 1.6-1.7x faster than the flash kernel on
an H100 (benchmarks/cp_block_bench.py); ``_scaled_dot_product_flash_attention`` otherwise. On CPU
``_scaled_dot_product_flash_attention_for_cpu`` (used by the tests; the ring keeps
block_math on CPU). cuDNN takes grouped K/V as they are (query head h reads key/value
head h // g, and its backward returns the group's summed key/value gradients); for the
flash kernel they are repeated to the query heads and their gradients summed back over
each group. No dropout: with dropout the ring runs on block_math.
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
    """The kernel calls that make up a planned block, or None when it needs an explicit mask.

    As few calls as the mask allows, each as large as it can be: fewer, longer kernels run
    faster, and each call's result costs a merge. A block whose rows and columns are the
    same ascending segments (a rank's own block under the load-balanced split) is one call
    under the kernel's causal mask: local order is then global order. Otherwise each query
    segment makes one unmasked call over the key segments it fully sees (adjacent spans
    joined, so the keys are a view), plus a causal call for a segment against itself.
    """
    if not plan.masked:
        return [(_joined(plan.rows), _joined(plan.cols), False)]
    if window is not None or not causal:
        return None
    segments = plan.row_segments
    ascending = all(a[0] + a[1] <= b[0] for a, b in zip(segments, segments[1:]))
    if segments == plan.col_segments and ascending:
        return [(_joined(plan.rows), _joined(plan.cols), True)]
    out: List[Piece] = []
    for q_seg, q_span in zip(plan.row_segments, plan.rows):
        visible = []
        for k_seg, k_span in zip(plan.col_segments, plan.cols):
            state = pair_state(q_seg, k_seg, float("inf"), 0)  # causal, no window
            if state == "full":
                visible.append(k_span)
            elif state == "partial":
                if q_seg != k_seg:
                    return None
                out.append(([q_span], [k_span], True))
        if visible:
            out.append(([q_span], _joined(visible), False))
    return out


def _joined(spans: List[Span]) -> List[Span]:
    """``spans`` with adjacent ones joined: (0, 4), (4, 4) -> (0, 8)."""
    out: List[Span] = []
    for offset, length in spans:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def _heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] -> [b, ng * g, s, hn] each."""
    b, ng, g, sq, hn = q.shape
    sk = k.shape[3]
    return (q.reshape(b, ng * g, sq, hn).contiguous(), k.expand(b, ng, g, sk, hn).reshape(b, ng * g, sk, hn).contiguous(),
            v.expand(b, ng, g, sk, hn).reshape(b, ng * g, sk, hn).contiguous())


def cuda_backend(q: torch.Tensor) -> str:
    """'cudnn' or 'flash': the CUDA kernel for q's blocks (see the module docstring)."""
    if (torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.shape[-1] <= 128):
        return "cudnn"
    return "flash"


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] -> q [b, ng * g, sq, hn] and
    k/v [b, ng, sk, hn] unrepeated: cuDNN's kernel maps query head h to key/value head
    h // g itself."""
    b, ng, g, sq, hn = q.shape
    sk = k.shape[3]
    return (q.reshape(b, ng * g, sq, hn).contiguous(), k.reshape(b, ng, sk, hn).contiguous(),
            v.reshape(b, ng, sk, hn).contiguous())


def forward(q, k, v, scale: float, causal: bool, backend: Optional[str] = None):
    """q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn] (one dtype) -> (out like q, normalized
    within the piece; lse [b, ng, g, sq] fp32). ``backend`` overrides cuda_backend."""
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_heads(q, k, v), 0.0, causal,
                                                                              scale=scale)
    elif (backend or cuda_backend(q)) == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(*_grouped(q, k, v), None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(*_heads(q, k, v), 0.0, causal, scale=scale)[:2]
    return out.view(q.shape), lse.reshape(q.shape[:-1])


def backward(q, k, v, out, dout, lse, scale: float, causal: bool, backend: Optional[str] = None):
    """Gradients of one piece given the final out, dout (like q) and lse (fp32) of its rows:
    dq [b, ng, g, sq, hn] in q's dtype, dk / dv [b, ng, 1, sk, hn] in fp32 (summed over the
    query heads of each group)."""
    b, ng, g, sq, hn = q.shape
    sk = k.shape[3]
    q4 = q.reshape(b, ng * g, sq, hn)
    out4, dout4 = out.reshape(q4.shape).contiguous(), dout.reshape(q4.shape).contiguous()
    lse3 = lse.reshape(b, ng * g, sq).contiguous()
    if q.is_cuda and (backend or cuda_backend(q)) == "cudnn":
        # The rng state only matters with dropout, which the kernel path does not take.
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout4, *_grouped(q, k, v), out4, lse3.unsqueeze(-1), seed, seed, None, None, None, sq, sk, 0.0,
            causal, scale=scale)
        return dq.view(q.shape), dk.view(k.shape).float(), dv.view(v.shape).float()
    if not q.is_cuda:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout4, *_heads(q, k, v), out4, lse3, 0.0, causal, scale=scale)
    else:
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout4, *_heads(q, k, v), out4, lse3, None, None, sq, sk, 0.0, causal, seed, offset, scale=scale)
    dk = dk.view(b, ng, g, sk, hn).sum(dim=2, keepdim=True, dtype=torch.float32)
    dv = dv.view(b, ng, g, sk, hn).sum(dim=2, keepdim=True, dtype=torch.float32)
    return dq.view(q.shape), dk, dv
