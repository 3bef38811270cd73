"""Autograd-aware tensor-parallel communication: one autograd.Function per collective.

Each public wrapper takes the group explicitly; ``group=None`` or a group of one rank
makes it the identity (no tensor parallelism). The forward/backward pairs are the
conjugates Megatron-Core uses, so that a parallel layer's gradients equal the serial ones:

=========================================  ==========================  ===========================
wrapper                                    forward                     backward
=========================================  ==========================  ===========================
copy_to_tensor_model_parallel_region       identity                    all-reduce
reduce_from_tensor_model_parallel_region   all-reduce                  identity
scatter_to_tensor_model_parallel_region    split last dim              all-gather last dim
gather_from_tensor_model_parallel_region   all-gather last dim         split last dim
scatter_to_sequence_parallel_region        split dim 0                 all-gather dim 0
gather_from_sequence_parallel_region       all-gather dim 0            reduce-scatter dim 0 (or split)
reduce_scatter_to_sequence_parallel_region reduce-scatter dim 0        all-gather dim 0
=========================================  ==========================  ===========================
"""

from __future__ import annotations

import torch

from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.collectives import (
    all_gather_first_dim,
    all_gather_last_dim,
    all_reduce_sum,
    reduce_scatter_first_dim,
)
from megatron.core.tensor_parallel.partition import split_tensor_along_first_dim, split_tensor_along_last_dim


def _split_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal chunk of the last dimension, contiguous."""
    world = group_size(group)
    if world == 1:
        return tensor
    return split_tensor_along_last_dim(tensor, world)[group_rank(group)].contiguous()


def _split_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal block of dim 0, contiguous."""
    world = group_size(group)
    if world == 1:
        return tensor
    return split_tensor_along_first_dim(tensor, world, group_rank(group))


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient over the group."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return all_reduce_sum(grad_output, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: identity."""

    @staticmethod
    def forward(ctx, input_, group):
        return all_reduce_sum(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_last_dim(grad_output, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's chunk of the last dim."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return all_gather_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_last_dim(grad_output, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's block of dim 0. Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_first_dim(grad_output, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather dim 0. Backward: reduce-scatter dim 0 when the consumer is
    tensor-parallel (each rank holds a partial gradient), else keep this rank's block."""

    @staticmethod
    def forward(ctx, input_, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_first_dim(grad_output, ctx.group), None, None
        return _split_first_dim(grad_output, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: sum over the group, keep this rank's block of dim 0. Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return reduce_scatter_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_first_dim(grad_output, ctx.group), None


def copy_to_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce over ``group``.

    Placed where a replicated activation enters a column-parallel layer: each rank's
    partial input gradient is summed.
    """
    if group_size(group) == 1:
        return input_
    return _CopyToModelParallelRegion.apply(input_, group)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity.

    Placed after a row-parallel matmul: the partial products are summed.
    """
    if group_size(group) == 1:
        return input_
    return _ReduceFromModelParallelRegion.apply(input_, group)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: split the last dim, keep this rank's chunk. Backward: all-gather the last dim.

    [..., h] -> [..., h / tp].
    """
    if group_size(group) == 1:
        return input_
    return _ScatterToModelParallelRegion.apply(input_, group)


def gather_from_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-gather the last dim. Backward: split the last dim, keep this rank's chunk.

    [..., h / tp] -> [..., h].
    """
    if group_size(group) == 1:
        return input_
    return _GatherFromModelParallelRegion.apply(input_, group)


def scatter_to_sequence_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: split dim 0, keep this rank's block. Backward: all-gather dim 0.

    [s, b, h] -> [s / tp, b, h].
    """
    if group_size(group) == 1:
        return input_
    return _ScatterToSequenceParallelRegion.apply(input_, group)


def gather_from_sequence_parallel_region(
    input_: torch.Tensor, group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """Forward: all-gather dim 0. Backward: reduce-scatter dim 0, or, with
    ``tensor_parallel_output_grad=False`` (the consumer is replicated, so every rank already
    holds the full gradient), split dim 0.

    [s / tp, b, h] -> [s, b, h].
    """
    if group_size(group) == 1:
        return input_
    return _GatherFromSequenceParallelRegion.apply(input_, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Forward: reduce-scatter dim 0 (sum, keep this rank's block). Backward: all-gather dim 0.

    [s, b, h] partial sums -> [s / tp, b, h] full sums.
    """
    if group_size(group) == 1:
        return input_
    return _ReduceScatterToSequenceParallelRegion.apply(input_, group)
