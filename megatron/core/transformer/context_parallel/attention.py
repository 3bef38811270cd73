"""Context-parallel core attention: one entry point for every --cp-comm-type.

The caller (DotProductAttention) holds this rank's load-balanced share of the sequence
(layout.py): query [s/cp, b, np, hn], key/value [s/cp, b, ng, hn]; the result is this
rank's context [s/cp, b, np, hn], exactly what one process would compute for those rows.

  p2p       ring exchange of K/V, block attention merged by log-sum-exp (p2p.py)
  all_gather  K/V gathered, local queries attend with a position mask (all_gather.py)
  a2a       Ulysses: all-to-all to head shards, full-sequence attention, all-to-all back
  a2a+p2p   a2a inside groups of --hierarchical-context-parallel-sizes[0] adjacent CP
            ranks, then a p2p ring across the groups (sizes[1] of them)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import process_groups
from megatron.core.transformer.context_parallel import block_math
from megatron.core.transformer.context_parallel.all_gather import gather_sequence
from megatron.core.transformer.context_parallel.all_to_all import head_to_seq, seq_to_head
from megatron.core.transformer.context_parallel.layout import local_segments, segment_positions
from megatron.core.transformer.context_parallel.p2p import Ring, ring_attention

COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
_ALIASES = {"allgather": "all_gather"}

# local_attend(query [sq, b, np, hn], key, value [sk, b, ng, hn], mask (bool, True = masked,
# broadcastable to [b, 1, sq, sk]) or None, is_causal, dropout_p) -> [sq, b, np, hn]
LocalAttend = Callable[..., torch.Tensor]


def resolve_comm_type(cp_comm_type, layer_number: int) -> str:
    """This layer's comm type from --cp-comm-type (one value, or one per layer; default p2p)."""
    value = cp_comm_type
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else value[layer_number - 1]
    name = _ALIASES.get(value or "p2p", value or "p2p")
    if name not in COMM_TYPES:
        raise ValueError(f"--cp-comm-type {value!r} is not supported: use one of {', '.join(COMM_TYPES)} (or allgather)")
    return name


def _initialize_communicator(cp_group) -> None:
    """A one-element all-reduce over the whole CP group (forward only, no gradient).

    NCCL requires the first batched send/receive on a communicator to involve all of its
    ranks; a2a+p2p first exchanges inside a subset, so the communicator is set up here."""
    if dist.get_backend(cp_group) == "nccl":
        dist.all_reduce(torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device())), group=cp_group)


class ContextParallelAttention:
    """Attention of this rank's queries over the whole (context-parallel) sequence.

    ``causal``: the causal mask applies; ``window``: (left, right) sliding window or None;
    ``local_attend``: the non-parallel attention used where no log-sum-exp is needed
    (all_gather and a2a), so those paths keep the chosen backend and dropout."""

    def __init__(
        self,
        comm_type: str,
        cp_group,
        causal: bool,
        window,
        scale: float,
        local_attend: LocalAttend,
        hierarchical_sizes: Optional[Sequence[int]] = None,
    ):
        self.comm_type = comm_type
        self.group = cp_group
        self.cp = process_groups.group_size(cp_group)
        self.rank = process_groups.group_rank(cp_group)
        self.members = [dist.get_global_rank(cp_group, i) for i in range(self.cp)]
        self.causal, self.window, self.scale = causal, window, scale
        self.local_attend = local_attend
        if comm_type == "a2a+p2p":
            sizes = list(hierarchical_sizes or [])
            if len(sizes) != 2 or sizes[0] * sizes[1] != self.cp:
                raise ValueError(
                    f"--hierarchical-context-parallel-sizes {sizes} with --cp-comm-type a2a+p2p must be two "
                    f"sizes (a2a, p2p) whose product is --context-parallel-size {self.cp}: e.g. 2 {self.cp // 2}"
                )
            self.inner = sizes[0]
            _initialize_communicator(cp_group)
        else:
            self.inner = self.cp if comm_type == "a2a" else 1

    def __call__(self, query, key, value, dropout_p: float = 0.0) -> torch.Tensor:
        if self.comm_type == "p2p":
            return self._ring(query, key, value, self.members, self.rank, query.shape[0], 1, dropout_p)
        if self.comm_type == "all_gather":
            return self._all_gather(query, key, value, dropout_p)
        return self._a2a(query, key, value, dropout_p)

    def _segments_of_ranks(self, cp_ranks: Sequence[int], local_len: int) -> List:
        """Segments of the concatenated tokens of CP ranks ``cp_ranks`` (local_len each)."""
        return [seg for r in cp_ranks for seg in local_segments(r, self.cp, local_len)]

    def _ring(self, query, key, value, members, index, local_len, inner, dropout_p):
        """Ring attention over ``members`` (global ranks); ring member m holds the tokens of
        CP ranks m*inner .. m*inner+inner-1, ``local_len`` tokens each, in that order."""
        segments = [self._segments_of_ranks(range(m * inner, (m + 1) * inner), local_len) for m in range(len(members))]
        ring = Ring(group=self.group, members=list(members), index=index, segments=segments)
        q, k, v = block_math.to_grouped(query, key, value)
        out = ring_attention(q, k, v, ring, self.causal, self.window, self.scale, dropout_p)
        return block_math.from_grouped(out)

    def _all_gather(self, query, key, value, dropout_p):
        s_local = query.shape[0]
        positions = segment_positions(self._segments_of_ranks(range(self.cp), s_local), query.device)
        order = torch.argsort(positions)  # gathered (rank order) -> position order
        k_all = gather_sequence(key, self.group).index_select(0, order)
        v_all = gather_sequence(value, self.group).index_select(0, order)
        outputs, offset = [], 0
        for start, n in local_segments(self.rank, self.cp, s_local):
            k_len = start + n if self.causal else k_all.shape[0]
            q_pos = torch.arange(start, start + n, device=query.device)
            mask = block_math.position_mask(q_pos, torch.arange(k_len, device=query.device), self.causal, self.window)
            outputs.append(
                self.local_attend(
                    query.narrow(0, offset, n), k_all[:k_len], v_all[:k_len], mask.view(1, 1, n, k_len), False, dropout_p
                )
            )
            offset += n
        return torch.cat(outputs, dim=0)

    def _a2a(self, query, key, value, dropout_p):
        a = self.inner
        np_, ng = query.shape[2], key.shape[2]
        if np_ % a:
            raise ValueError(
                f"--num-attention-heads per tensor-parallel rank ({np_}) must be divisible by the all-to-all "
                f"context-parallel size {a} for --cp-comm-type {self.comm_type}: change the head count or the CP size"
            )
        if ng % a:
            # Too few key/value groups to split: give every query head its own K/V copy.
            key, value = key.repeat_interleave(np_ // ng, dim=2), value.repeat_interleave(np_ // ng, dim=2)
        outer_index, inner_index = divmod(self.rank, a)
        inner_members = [self.members[outer_index * a + i] for i in range(a)]
        q, k, v = (seq_to_head(t, inner_members, inner_index, self.group) for t in (query, key, value))
        s_local = query.shape[0]
        if self.comm_type == "a2a":
            out = self._full_sequence(q, k, v, s_local, dropout_p)
        else:
            ring_members = [self.members[m * a + inner_index] for m in range(self.cp // a)]
            out = self._ring(q, k, v, ring_members, outer_index, s_local, a, dropout_p)
        return head_to_seq(out, inner_members, inner_index, self.group)

    def _full_sequence(self, q, k, v, s_local, dropout_p):
        """Attention over the whole sequence held in rank order: sort by position, attend, unsort."""
        positions = segment_positions(self._segments_of_ranks(range(self.cp), s_local), q.device)
        order = torch.argsort(positions)
        inverse = torch.argsort(order)
        q, k, v = (t.index_select(0, order) for t in (q, k, v))
        s = q.shape[0]
        only_causal = self.causal and self.window is None
        mask = None
        if not only_causal and (self.causal or self.window is not None):
            pos = torch.arange(s, device=q.device)
            mask = block_math.position_mask(pos, pos, self.causal, self.window).view(1, 1, s, s)
        out = self.local_attend(q, k, v, mask, only_causal, dropout_p)
        return out.index_select(0, inverse)
