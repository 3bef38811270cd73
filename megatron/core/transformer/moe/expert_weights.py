"""The local experts' weights as one [G, out, in] tensor for the grouped GEMM, without a
copy per micro-batch.

``GroupedMLP`` keeps Megatron's per-expert parameters (``local_experts.{i}.linear_fc1.weight``)
but makes their data adjacent views of one contiguous tensor (``place_adjacent``), at
construction and again after a dtype or device move. ``stacked`` then returns that whole
tensor as a view (backward: the gradient split per expert, as torch.stack's backward
does) when the parameters are still adjacent, checked on the host at every call; when
something re-homed a parameter's data (the distributed optimizer's parameter buffer, an
FSDP wrapper, a user's ``param.data = ...``) it falls back to ``torch.stack``, which
copies but is always right.
"""

from __future__ import annotations

from typing import Sequence

import torch


def are_adjacent(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` (same shape, contiguous) lie one after another in one storage,
    so that the first one's storage viewed as [G, *shape] is their stack."""
    first = params[0]
    # Tensor subclasses (FSDP's DTensor) have no single local storage to view.
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in params) or not first.is_contiguous():
        return False
    storage, offset, numel = first.untyped_storage().data_ptr(), first.storage_offset(), first.numel()
    for i, p in enumerate(params):
        if p.shape != first.shape or p.dtype != first.dtype or p.device != first.device or not p.is_contiguous():
            return False
        if p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset + i * numel:
            return False
    return True


@torch.no_grad()
def place_adjacent(params: Sequence[torch.nn.Parameter]) -> None:
    """Copy the data of ``params`` (same shape, dtype, device) into one new contiguous
    [G, *shape] tensor and point each parameter's data at its slice."""
    first = params[0]
    stacked = torch.empty((len(params),) + tuple(first.shape), dtype=first.dtype, device=first.device)
    for i, p in enumerate(params):
        stacked[i].copy_(p.data)
        p.data = stacked[i]


class _AdjacentStack(torch.autograd.Function):
    """Forward: the [G, *shape] view over adjacent parameters (no copy). Backward: the
    gradient split along dim 0, one slice per parameter."""

    @staticmethod
    def forward(ctx, *params):
        first = params[0]
        shape = (len(params),) + tuple(first.shape)
        return first.as_strided(shape, (first.numel(),) + tuple(first.stride()), first.storage_offset())

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(params)``, as a view without a copy when they are adjacent."""
    params = list(params)
    if are_adjacent(params):
        return _AdjacentStack.apply(*params)
    return torch.stack(params)
