"""All-to-all between sequence-sharded and head-sharded layouts (Ulysses), over a subset
of the context-parallel group.

Members are global ranks inside ``group``; the exchange is a batch of point-to-point
sends and receives, so a subset (one level of hierarchical CP) needs no group of its own.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from megatron.core.fake_backend import receive_buffer


def exchange_chunks(chunks: Sequence[torch.Tensor], members: Sequence[int], index: int, group) -> List[torch.Tensor]:
    """Send chunks[j] to members[j] and return what each member j sent to this process.

    Forward only (the autograd Functions below route gradients). This process's own
    chunk is kept without communication."""
    received = [receive_buffer(c.shape, c.dtype, c.device, group) for c in chunks]
    ops = []
    for j, peer in enumerate(members):
        if j == index:
            received[j] = chunks[j]
            continue
        ops.append(dist.P2POp(dist.isend, chunks[j].contiguous(), peer, group))
        ops.append(dist.P2POp(dist.irecv, received[j], peer, group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received


def _seq_to_head(x, members, index, group):
    chunks = torch.chunk(x, len(members), dim=2)
    return torch.cat(exchange_chunks(chunks, members, index, group), dim=0)


def _head_to_seq(x, members, index, group):
    chunks = torch.chunk(x, len(members), dim=0)
    return torch.cat(exchange_chunks(chunks, members, index, group), dim=2)


class _SeqToHead(torch.autograd.Function):
    """Forward: [s, b, H, hn] sequence shard -> [a*s, b, H/a, hn] (members' shards in
    member order, this process's share of heads). Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, members, index, group):
        ctx.args = (members, index, group)
        return _seq_to_head(x, members, index, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, *ctx.args), None, None, None


class _HeadToSeq(torch.autograd.Function):
    """Forward: [a*s, b, H/a, hn] -> [s, b, H, hn] (inverse of _SeqToHead).
    Backward: the sequence-to-head all-to-all."""

    @staticmethod
    def forward(ctx, x, members, index, group):
        ctx.args = (members, index, group)
        return _head_to_seq(x, members, index, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, *ctx.args), None, None, None


def seq_to_head(x: torch.Tensor, members: Sequence[int], index: int, group) -> torch.Tensor:
    """All-to-all [s, b, H, hn] -> [len(members) * s, b, H / len(members), hn]; backward inverse."""
    return _SeqToHead.apply(x, list(members), index, group)


def head_to_seq(x: torch.Tensor, members: Sequence[int], index: int, group) -> torch.Tensor:
    """All-to-all [a * s, b, H / a, hn] -> [s, b, H, hn]; backward inverse."""
    return _HeadToSeq.apply(x, list(members), index, group)
