"""K/V all-gather over the context-parallel group (--cp-comm-type all_gather).

Every rank gathers the whole sequence's K/V, puts it in position order, and attends its
own two query chunks to the keys they can see (a causal chunk only needs the keys up to
its last position). Backward: the gathered K/V gradients are summed over ranks and each
rank keeps its own tokens' share (a reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import process_groups


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(process_groups.group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = process_groups.group_size(group)
    if dist.get_backend(group) == "nccl":
        out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    # gloo has no reduce-scatter: sum everywhere, keep this rank's rows.
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    rank = process_groups.group_rank(group)
    return total.narrow(0, rank * (x.shape[0] // size), x.shape[0] // size).contiguous()


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather [s, b, ...] shards of ``group`` into [cp*s, b, ...] (rank order).
    Backward: reduce-scatter the gradient, each rank keeping its own shard's rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_first_dim(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 over ``group`` (rank order); backward reduce-scatters."""
    return _GatherSequence.apply(x, group)
