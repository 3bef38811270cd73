"""The collectives of data parallelism, each on one flat bucket, in place, optionally async.

Unlike ``tensor_parallel.collectives`` (out-of-place, synchronous, for activations), these
work on views of the contiguous grad and param buffers so that nothing is copied, and can
return an async handle so that a bucket's communication overlaps backward or forward.
They share that module's switch ``native_single_tensor_collectives``: on gloo, whose
single-tensor collectives differ between builds, reduce-scatter is an all-reduce of the
whole bucket (every block is then reduced, including this rank's) and all-gather uses the
list form, both available in every build.

Each returns the async work handle when ``async_op`` is True and the group has more
than one rank, else None.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_size
from megatron.core.tensor_parallel.collectives import native_single_tensor_collectives

# Newer torch renames the single-tensor collectives; the old names warn but still work.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce_grad_bucket(grad_data: torch.Tensor, group, op=None, async_op: bool = False):
    """Forward: reduce (SUM or ``op``) the bucket ``grad_data`` in place over ``group``;
    every rank ends with the whole reduced bucket. Backward: not differentiable (runs on
    ``main_grad`` outside autograd). No-op for a 1-rank group."""
    if group_size(group) == 1:
        return None
    return dist.all_reduce(grad_data, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)


def reduce_scatter_grad_bucket(grad_data: torch.Tensor, shard: torch.Tensor, group, op=None,
                               async_op: bool = False):
    """Forward: reduce (SUM or ``op``) the bucket ``grad_data`` over ``group`` and leave
    this rank's block (``shard``, the view ``grad_data[r*n:(r+1)*n]`` with n = numel/world)
    holding the result; the other blocks are unspecified afterwards. Backward: not
    differentiable. No-op for a 1-rank group."""
    if group_size(group) == 1:
        return None
    op = op or dist.ReduceOp.SUM
    if native_single_tensor_collectives(group):
        # In place: NCCL allows the output to be this rank's block of the input.
        return _REDUCE_SCATTER_SINGLE(shard, grad_data, op=op, group=group, async_op=async_op)
    return dist.all_reduce(grad_data, op=op, group=group, async_op=async_op)


def all_gather_param_bucket(param_data: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Forward: fill the bucket ``param_data`` with every rank's block, in rank order;
    ``shard`` is this rank's block (a view of ``param_data``), which it contributes.
    Backward: not differentiable (runs on ``param.data``). No-op for a 1-rank group."""
    world = group_size(group)
    if world == 1:
        return None
    if native_single_tensor_collectives(group):
        return _ALL_GATHER_SINGLE(param_data, shard, group=group, async_op=async_op)
    return dist.all_gather(list(param_data.chunk(world)), shard, group=group, async_op=async_op)
