"""Block attention with log-sum-exp, the merge of partial results, and its exact backward.

Context-parallel attention computes softmax(q k^T * scale) v over key blocks that arrive
one at a time. Each block yields a partial output o_i (softmax over that block only) and
the row log-sum-exp l_i of its scores; blocks merge exactly as
    l = log(sum_i exp(l_i)),   o = sum_i exp(l_i - l) * o_i.
The backward recomputes each block's probabilities from the saved final l:
    P = exp(S - l), dV = P^T dO, dS = P * (dO V^T - D), dQ = dS K * scale,
    dK = dS^T Q * scale, with D = rowsum(dO * O).

Layout here is grouped by key/value group so that GQA never repeats K/V in memory:
q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn], lse [b, ng, g, sq], where g = np / ng.
Everything is computed in float32 (the plain-math path, exact on CPU).

Masks come from segments of global positions (see layout.py): for causal attention key
position j is visible from query i when j <= i; a window (left, right) also needs
i - left <= j (and j <= i + right without the causal mask), the flash-attention convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron.core.fusions.compiled_region import CompiledRegion
from megatron.core.transformer.context_parallel.layout import Segment, segment_positions

_INF = float("inf")


def _reach(causal: bool, window) -> Tuple[float, float]:
    """(left, right): how far before / after its own position a query may look."""
    left, right = _INF, _INF
    if window is not None:
        if window[0] >= 0:
            left = window[0]
        if window[1] >= 0:
            right = window[1]
    if causal:
        right = 0
    return left, right


def pair_state(q: Segment, k: Segment, left: float, right: float) -> str:
    """'empty', 'full' or 'partial' visibility of key segment ``k`` from query segment ``q``."""
    qs, qe = q[0], q[0] + q[1] - 1
    ks, ke = k[0], k[0] + k[1] - 1
    if qe < ks - right or qs > ke + left:
        return "empty"
    if qs + right >= ke and qe - left <= ks:
        return "full"
    return "partial"


@dataclass
class BlockPlan:
    """The part of a (query, key) block that is not entirely masked.

    rows / cols: (local offset, length) spans of the query / key sequence to use;
    row_segments / col_segments: their global positions; masked: whether some pair of
    the selected rows and columns is only partly visible (an explicit mask is needed).
    """

    rows: List[Tuple[int, int]]
    cols: List[Tuple[int, int]]
    row_segments: List[Segment]
    col_segments: List[Segment]
    masked: bool


def _spans(segments: Sequence[Segment]) -> List[Tuple[int, int]]:
    out, offset = [], 0
    for _, n in segments:
        out.append((offset, n))
        offset += n
    return out


def plan_block(q_segments: Sequence[Segment], k_segments: Sequence[Segment], causal: bool, window) -> Optional[BlockPlan]:
    """The rows and columns of a block worth computing; None when it is fully masked."""
    left, right = _reach(causal, window)
    state = [[pair_state(q, k, left, right) for k in k_segments] for q in q_segments]
    rows = [i for i, r in enumerate(state) if any(s != "empty" for s in r)]
    cols = [j for j in range(len(k_segments)) if any(state[i][j] != "empty" for i in rows)]
    if not rows:
        return None
    q_spans, k_spans = _spans(q_segments), _spans(k_segments)
    return BlockPlan(
        rows=[q_spans[i] for i in rows],
        cols=[k_spans[j] for j in cols],
        row_segments=[q_segments[i] for i in rows],
        col_segments=[k_segments[j] for j in cols],
        masked=any(state[i][j] != "full" for i in rows for j in cols),
    )


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window) -> torch.Tensor:
    """Bool [sq, sk], True = masked, for queries / keys at global positions q_pos / k_pos."""
    left, right = _reach(causal, window)
    diff = k_pos.view(1, -1) - q_pos.view(-1, 1)  # key minus query position
    mask = torch.zeros(diff.shape, dtype=torch.bool, device=diff.device)
    if right != _INF:
        mask |= diff > right
    if left != _INF:
        mask |= diff < -left
    return mask


def plan_mask(plan: BlockPlan, causal: bool, window, device) -> Optional[torch.Tensor]:
    """The explicit mask of a planned block, or None when every selected pair is visible."""
    if not plan.masked:
        return None
    return position_mask(
        segment_positions(plan.row_segments, device), segment_positions(plan.col_segments, device), causal, window
    )


def take(x: torch.Tensor, spans: Sequence[Tuple[int, int]], dim: int) -> torch.Tensor:
    """The concatenation of the ``spans`` (offset, length) of ``x`` along ``dim``."""
    if len(spans) == 1:
        return x.narrow(dim, spans[0][0], spans[0][1])
    return torch.cat([x.narrow(dim, o, n) for o, n in spans], dim=dim)


def add_into(acc: torch.Tensor, spans: Sequence[Tuple[int, int]], value: torch.Tensor, dim: int) -> None:
    """acc[spans] += value, where value is the concatenation of those spans along ``dim``."""
    offset = 0
    for o, n in spans:
        acc.narrow(dim, o, n).add_(value.narrow(dim, offset, n))
        offset += n


def _scores(q, k, scale, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, ng, g, sq, sk]
    if mask is not None:
        scores = scores.masked_fill(mask, -_INF)
    return scores


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see no key) replaced by 0, so exp(s - lse) stays 0, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


# Most fp32 score elements one block step materializes (1 GiB): long sequences are
# processed a tile of query rows at a time so memory stays bounded.
SCORE_ELEMENTS_PER_TILE = 1 << 28


def _row_tiles(q: torch.Tensor, sk: int):
    """(start, length) tiles of q's rows (dim 3) within SCORE_ELEMENTS_PER_TILE."""
    b, ng, g, sq, _ = q.shape
    rows = max(1, SCORE_ELEMENTS_PER_TILE // max(1, b * ng * g * sk))
    return [(start, min(rows, sq - start)) for start in range(0, sq, rows)]


def _mask_rows(mask: Optional[torch.Tensor], start: int, n: int) -> Optional[torch.Tensor]:
    return None if mask is None else mask.narrow(0, start, n)


def dropout_keep_scale(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """Attention dropout of one tile: keep / (1 - p) (fp32, of ``shape``), drawn from a
    generator seeded with ``seed``, so the backward redraws exactly the forward's mask."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 63))
    keep = torch.rand(shape, generator=generator, device=device) >= dropout_p
    return keep.to(torch.float32) / (1.0 - dropout_p)


def _tile_dropout(dropout, start: int, shape, device):
    """dropout = None or (p, block seed): the keep/(1-p) factor of the tile at row ``start``."""
    if dropout is None:
        return None
    p, seed = dropout
    return dropout_keep_scale(shape, p, seed * 1000003 + start, device)


def block_forward(q, k, v, scale: float, mask: Optional[torch.Tensor], dropout=None):
    """fp32 q [b, ng, g, sq, hn], k/v [b, ng, 1, sk, hn], mask [sq, sk] or None
    -> (out [b, ng, g, sq, hn] normalized within the block, lse [b, ng, g, sq]).

    ``dropout`` (p, seed) drops probabilities after the softmax; the log-sum-exp is that
    of the undropped scores, so blocks still merge exactly."""
    outs, lses = [], []
    for start, n in _row_tiles(q, k.shape[3]):
        scores = _scores(q.narrow(3, start, n), k, scale, _mask_rows(mask, start, n))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
        drop = _tile_dropout(dropout, start, probs.shape, probs.device)
        if drop is not None:
            probs = probs * drop
        outs.append(torch.matmul(probs, v))
        lses.append(lse)
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3)


def _merged(out_old, lse_old, out_blk, lse_blk):
    """(out, lse) of two partial results of the same rows; out_blk in any float dtype."""
    lse_new = torch.logaddexp(lse_old, lse_blk)
    safe = _finite(lse_new)
    merged = (out_old * torch.exp(lse_old - safe).unsqueeze(-1)
              + out_blk.float() * torch.exp(lse_blk - safe).unsqueeze(-1))
    return merged, lse_new


# One fused kernel on CUDA instead of ~10 elementwise passes over the fp32 output.
_merge = CompiledRegion(_merged, "cp_merge")


def merge_into(out_acc, lse_acc, out_blk, lse_blk, rows, dim_seq: int = 3) -> None:
    """Fold a block result for query ``rows`` into the running (out, lse) accumulators, in place."""
    merged, lse_new = _merge(take(out_acc, rows, dim_seq), take(lse_acc, rows, dim_seq), out_blk, lse_blk)
    offset = 0
    for o, n in rows:
        out_acc.narrow(dim_seq, o, n).copy_(merged.narrow(dim_seq, offset, n))
        lse_acc.narrow(dim_seq, o, n).copy_(lse_new.narrow(dim_seq, offset, n))
        offset += n


def accumulate(out_acc, lse_acc, out_blk, lse_blk, rows, seq_len: int, dim_seq: int = 3):
    """merge_into for a running result that may not exist yet: the first result covering
    every row becomes the accumulator as it is (no merge with zeros); returns the
    accumulators (out fp32, lse)."""
    if out_acc is None:
        if list(rows) == [(0, seq_len)]:
            return out_blk.float(), lse_blk
        out_acc = torch.zeros(out_blk.shape[:dim_seq] + (seq_len,) + out_blk.shape[dim_seq + 1:],
                              dtype=torch.float32, device=out_blk.device)
        lse_acc = torch.full(out_acc.shape[:-1], -_INF, dtype=torch.float32, device=out_blk.device)
    merge_into(out_acc, lse_acc, out_blk, lse_blk, rows, dim_seq)
    return out_acc, lse_acc


def block_backward(q, k, v, dout, lse, delta, scale: float, mask: Optional[torch.Tensor], dropout=None):
    """Gradients of one block given the final lse and delta = rowsum(dO * O), all fp32.

    Returns dq [b, ng, g, sq, hn], dk and dv [b, ng, 1, sk, hn] (summed over the g query
    heads that share each key/value group). ``dropout`` must be the forward's (p, seed)."""
    dqs, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for start, n in _row_tiles(q, k.shape[3]):
        q_t, do_t = q.narrow(3, start, n), dout.narrow(3, start, n)
        scores = _scores(q_t, k, scale, _mask_rows(mask, start, n))
        probs = torch.exp(scores - _finite(lse.narrow(3, start, n)).unsqueeze(-1))
        dprobs = torch.matmul(do_t, v.transpose(-1, -2))
        drop = _tile_dropout(dropout, start, probs.shape, probs.device)
        dropped = probs if drop is None else probs * drop
        if drop is not None:
            dprobs = dprobs * drop
        dv += torch.matmul(dropped.transpose(-1, -2), do_t).sum(dim=2, keepdim=True)
        dscores = probs * (dprobs - delta.narrow(3, start, n).unsqueeze(-1))
        dqs.append(torch.matmul(dscores, k) * scale)
        dk += torch.matmul(dscores.transpose(-1, -2), q_t).sum(dim=2, keepdim=True) * scale
    return torch.cat(dqs, dim=3), dk, dv


def to_grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """q [s, b, np, hn], k/v [s, b, ng, hn] -> q [b, ng, np/ng, s, hn], k/v [b, ng, 1, s, hn]."""
    sq, b, np_, hn = query.shape
    ng = key.shape[2]
    q = query.permute(1, 2, 0, 3).reshape(b, ng, np_ // ng, sq, hn)
    return q, key.permute(1, 2, 0, 3).unsqueeze(2), value.permute(1, 2, 0, 3).unsqueeze(2)


def from_grouped(out: torch.Tensor) -> torch.Tensor:
    """[b, ng, g, s, hn] -> [s, b, ng * g, hn]."""
    b, ng, g, s, hn = out.shape
    return out.reshape(b, ng * g, s, hn).permute(2, 0, 1, 3)
