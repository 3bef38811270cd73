"""Raw tensor collectives over one group, with a gloo-safe path for each.

These are plain functions without autograd; ``mappings.py`` wraps them in autograd
Functions. None modifies its input (so a caller may pass a tensor that autograd saved for
backward); with a group of one rank each returns its input unchanged.

NCCL (and any backend other than gloo) gets the single-tensor native collectives.
Gloo's support for ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` differs between
builds, so on gloo they are expressed with ``all_reduce`` and list ``all_gather``, which
every build has. ``native_single_tensor_collectives`` is the one switch between the two.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.fake_backend import gather_output, scatter_output
from megatron.core.process_groups import group_rank, group_size

# Newer torch renames the single-tensor collectives; the old names warn but still work.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def native_single_tensor_collectives(group) -> bool:
    """Whether ``group``'s backend is trusted with single-tensor all-gather/reduce-scatter."""
    return dist.get_backend(group) != "gloo"


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``tensor`` over ``group``, as a new tensor of the same shape."""
    if group_size(group) == 1:
        return tensor
    out = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def all_gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order: [n, ...] -> [n*world, ...]."""
    out, work = all_gather_first_dim_async(tensor, group)
    if work is not None:
        work.wait()
    return out


def all_gather_first_dim_async(tensor: torch.Tensor, group) -> Tuple[torch.Tensor, Optional[dist.Work]]:
    """``all_gather_first_dim`` started asynchronously: (output, work to wait on, or None
    when nothing is in flight). On gloo it completes before returning."""
    world = group_size(group)
    if world == 1:
        return tensor, None
    tensor = tensor.contiguous()
    out = gather_output(tensor, world, group)
    if native_single_tensor_collectives(group):
        return out, _ALL_GATHER_SINGLE(out, tensor, group=group, async_op=True)
    dist.all_gather(list(out.chunk(world, dim=0)), tensor, group=group)
    return out, None


def reduce_scatter_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group``, keep this rank's block of dim 0: [n*world, ...] -> [n, ...]."""
    out, work = reduce_scatter_first_dim_async(tensor, group)
    if work is not None:
        work.wait()
    return out


def reduce_scatter_first_dim_async(tensor: torch.Tensor, group) -> Tuple[torch.Tensor, Optional[dist.Work]]:
    """``reduce_scatter_first_dim`` started asynchronously: (output, work or None); on gloo
    it completes before returning."""
    world = group_size(group)
    if world == 1:
        return tensor, None
    if tensor.size(0) % world:
        raise ValueError(
            f"reduce-scatter along dim 0 needs a first dimension divisible by the group size: "
            f"{tensor.size(0)} is not divisible by {world}; with --sequence-parallel the sequence "
            "length must be a multiple of --tensor-model-parallel-size"
        )
    tensor = tensor.contiguous()
    if native_single_tensor_collectives(group):
        out = scatter_output(tensor, world, group)
        return out, _REDUCE_SCATTER_SINGLE(out, tensor, group=group, async_op=True)
    # gloo: reduce everything, keep our block (world times the traffic; CPU runs are tiny)
    total = all_reduce_sum(tensor, group)
    return total.chunk(world, dim=0)[group_rank(group)].contiguous(), None


def all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the last dim in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    # gather along dim 0 (contiguous blocks), then move the rank axis next to the last dim
    gathered = all_gather_first_dim(tensor.unsqueeze(0), group)
    return torch.cat(gathered.unbind(0), dim=-1).contiguous()


def comm_device(group) -> torch.device:
    """Where buffers for a collective over ``group`` must live: the current GPU for NCCL,
    the CPU for gloo."""
    if torch.cuda.is_available() and dist.get_backend(group) != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
