"""Attention of a few new queries per sequence against a long key/value cache (decoding).

A decode step brings one token per sequence (a few with speculative or chunked input)
and attends to everything cached. Its cost is reading the cache, so each cached key and
value must be read once: the queries of one key/value group become the rows of one
matrix, [b, ng, (np/ng) * sq, hn], multiplied by that group's keys in place. The SDPA
path would first repeat K/V once per query head of the group for cuDNN (np/ng copies
of the whole cache, every layer, every step), which at batch 32 costs more than the
step's weight reads.

The cache is sequence-first, [sk, b, ng, hn]; ``key.permute(1, 2, 3, 0)`` is a strided
view that batched GEMMs take as it is (no copy).
"""

from __future__ import annotations

from typing import Optional

import torch

# Most new queries per sequence for which inference attention takes this path; prefill
# (many queries) is compute-bound and stays on the fused kernels.
DECODE_MAX_QUERIES = 8

# Megatron fills masked scores with -10000 before the softmax; any value far below the
# real scores gives the same probabilities (exactly 0 after exp in fp32).
MASKED_SCORE = -10000.0


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: Optional[torch.Tensor], scale: float, coeff: float = 1.0,
                             softmax_in_fp32: bool = True) -> torch.Tensor:
    """query [sq, b, np, hn], key/value [sk, b, ng, hn], mask broadcastable to
    [b, 1, sq, sk] (True = masked) or None -> context [sq, b, np, hn].

    ``coeff`` is query-key layer scaling: scores are divided by it before the softmax
    input is computed in fp32 and multiplied back (the same math, kept in range)."""
    sq, b, np_, hn = query.shape
    sk, ng = key.shape[0], key.shape[2]
    group = np_ // ng
    q = query.permute(1, 2, 0, 3).reshape(b, ng, group * sq, hn)  # rows: (head of the group, query)
    scores = torch.matmul(q, key.permute(1, 2, 3, 0)) * (scale / coeff)  # [b, ng, group * sq, sk]
    if softmax_in_fp32:
        scores = scores.float()
    scores = scores * coeff
    if mask is not None:
        scores = scores.view(b, ng, group, sq, sk).masked_fill(mask.unsqueeze(2), MASKED_SCORE)
        scores = scores.view(b, ng, group * sq, sk)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    context = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, ng, group * sq, hn]
    return context.view(b, np_, sq, hn).permute(2, 0, 1, 3)
