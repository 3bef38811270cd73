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

With several distributed-optimizer instances a bucket's reduction is two collectives in a
row (``reduce_scatter_across_instances``): a reduce-scatter inside the instance, then an
all-reduce of this rank's block across the instances. Their async handle chains them: on
a GPU both are queued in order on a side stream, so the host never waits and backward
kernels keep running; elsewhere (gloo) the all-reduce runs when the handle is waited on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from typing import Dict

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


def all_reduce_shard_across_instances(shard: torch.Tensor, inter_group, op=None, async_op: bool = False):
    """Forward: reduce (SUM or ``op``) this rank's reduce-scattered block ``shard`` in place
    over ``inter_group``, the ranks that own the same block in every distributed-optimizer
    instance; all of them end with the same values. Backward: not differentiable. No-op
    for a 1-rank group."""
    return all_reduce_grad_bucket(shard, inter_group, op=op, async_op=async_op)


class _AllReduceWhenWaited:
    """Handle of an instance reduce-scatter off the GPU: ``wait`` finishes it, then runs
    the all-reduce across instances."""

    def __init__(self, reduce_scatter, shard: torch.Tensor, inter_group, op) -> None:
        self.reduce_scatter, self.shard, self.inter_group, self.op = reduce_scatter, shard, inter_group, op

    def wait(self) -> bool:
        if self.reduce_scatter is not None:
            self.reduce_scatter.wait()
        all_reduce_shard_across_instances(self.shard, self.inter_group, op=self.op)
        return True


class _SideStreamWork:
    """Handle of collectives queued on a side CUDA stream: ``wait`` makes the current
    stream wait for them (the host does not block)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def wait(self) -> bool:
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return True


_SIDE_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def reduce_scatter_across_instances(grad_data: torch.Tensor, shard: torch.Tensor, intra_group, inter_group,
                                    op=None, async_op: bool = False):
    """Forward: reduce-scatter the bucket ``grad_data`` over ``intra_group`` (this rank's
    distributed-optimizer instance) into ``shard`` as ``reduce_scatter_grad_bucket`` does,
    then all-reduce ``shard`` over ``inter_group``: ``shard`` ends with the reduction over
    all data-parallel ranks of both groups, the same in every instance. Backward: not
    differentiable. Returns a handle whose ``wait`` completes both when ``async_op``
    (see the module docstring), else None."""
    if not async_op:
        reduce_scatter_grad_bucket(grad_data, shard, intra_group, op=op)
        all_reduce_shard_across_instances(shard, inter_group, op=op)
        return None
    if grad_data.is_cuda:
        stream = _side_stream(grad_data.device)
        # The grads were produced on the current stream.
        stream.wait_stream(torch.cuda.current_stream(grad_data.device))
        with torch.cuda.stream(stream):
            reduce_scatter_grad_bucket(grad_data, shard, intra_group, op=op)
            all_reduce_shard_across_instances(shard, inter_group, op=op)
        return _SideStreamWork(stream)
    first = reduce_scatter_grad_bucket(grad_data, shard, intra_group, op=op, async_op=True)
    return _AllReduceWhenWaited(first, shard, inter_group, op)
