"""Groups of torch's fake process-group backend, which move no data.

A process on the fake backend plays one rank of a job whose other ranks do not exist: every
collective returns at once. All-reduces, broadcasts and receives leave their tensors as they
were; an all-gather copies this rank's block into every slot of its output, and a
reduce-scatter this rank's block of its input into its output, except in earlier torch
releases (2.11), which leave a reduce-scatter's output untouched. The application uses it to
measure one rank's memory and step time on a single GPU (``--fake-process-group``).

What core code does differently on such a group, so that the values it computes stay finite
and do not depend on the torch release (they are meaningless either way): a buffer that only
a receive would fill starts at zero (``receive_buffer``) instead of holding whatever memory it
was given; an all-gather's output starts as copies of this rank's block and a
reduce-scatter's as this rank's block (``gather_output``, ``scatter_output``), what the
backend writes where it writes anything; and a broadcast of data keeps the data the
receiving rank read itself (``tensor_parallel.broadcast_data``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

FAKE_BACKEND = "fake"


def is_fake(group=None) -> bool:
    """Whether ``group`` (None: the default group) is on torch's fake backend."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend(group) == FAKE_BACKEND


def gather_output(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    """The [world * n, ...] output of an all-gather of ``tensor`` [n, ...] over ``group``:
    uninitialized, or on a fake group ``world`` copies of ``tensor`` (every rank's block taken
    to be this rank's own)."""
    if is_fake(group):
        return tensor.repeat((world,) + (1,) * (tensor.dim() - 1))
    return torch.empty((world * tensor.size(0),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)


def scatter_output(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    """The [n, ...] output of a reduce-scatter of ``tensor`` [world * n, ...] over ``group``:
    uninitialized, or on a fake group a copy of this rank's block of ``tensor`` (the sum over
    ranks taken to be this rank's own term)."""
    n = tensor.size(0) // world
    if is_fake(group):
        return tensor[dist.get_rank(group) * n:(dist.get_rank(group) + 1) * n].clone()
    return torch.empty((n,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)


def receive_buffer(shape: Sequence[int], dtype: torch.dtype, device, group,
                   requires_grad: bool = False) -> torch.Tensor:
    """A tensor for a receive over ``group`` to fill: uninitialized, or zeros on a fake group,
    where no receive ever writes it (uninitialized memory may hold NaN or Inf bit patterns)."""
    make = torch.zeros if is_fake(group) else torch.empty
    return make(tuple(shape), dtype=dtype, device=device, requires_grad=requires_grad)
