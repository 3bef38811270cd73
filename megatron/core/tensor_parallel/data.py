"""Broadcast a batch from tensor-parallel rank 0 to the other ranks of its group.

Only tp rank 0 reads data; the others receive the same tensors. Sizes go first (one small
int64 broadcast), then all tensors flattened into one buffer of ``datatype``. On torch's
fake backend, where a broadcast delivers nothing, every rank reads and keeps its own data
(``megatron.core.fake_backend``).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core.fake_backend import is_fake
from megatron.core.tensor_parallel.collectives import comm_device

from megatron.core.process_groups import group_rank, group_size

_MAX_DATA_DIM = 5


def _check_data(keys: Sequence[str], data: Mapping[str, torch.Tensor], datatype: torch.dtype) -> None:
    for key in keys:
        if key not in data:
            raise KeyError(f"broadcast_data: key {key!r} is missing from the data on tensor-parallel rank 0")
        tensor = data[key]
        if tensor.dtype != datatype:
            raise ValueError(f"broadcast_data: {key!r} has dtype {tensor.dtype}, expected {datatype}")
        if tensor.dim() > _MAX_DATA_DIM:
            raise ValueError(f"broadcast_data: {key!r} has {tensor.dim()} dims, at most {_MAX_DATA_DIM} supported")


def _broadcast_sizes(keys: Sequence[str], data, group, src: int, device: torch.device,
                     holds_data: bool) -> List[torch.Size]:
    """Every key's shape, sent from ``src`` in one int64 broadcast (``holds_data``: this rank
    packs its own shapes, as the source does).

    Per key: [ndim, d0, ..., d4]; ndim is sent so that 0-dim tensors and zero-size dims
    survive the zero padding.
    """
    slot = _MAX_DATA_DIM + 1
    packed = torch.zeros(len(keys) * slot, dtype=torch.long)
    if holds_data:
        for i, key in enumerate(keys):
            shape = data[key].shape
            packed[i * slot] = len(shape)
            packed[i * slot + 1 : i * slot + 1 + len(shape)] = torch.tensor(shape, dtype=torch.long)
    packed = packed.to(device)
    dist.broadcast(packed, src, group=group)
    packed = packed.cpu()
    shapes = []
    for i in range(len(keys)):
        ndim = int(packed[i * slot])
        shapes.append(torch.Size(packed[i * slot + 1 : i * slot + 1 + ndim].tolist()))
    return shapes


def broadcast_data(
    keys: Sequence[str], data: Optional[Mapping[str, torch.Tensor]], datatype: torch.dtype, tp_group,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> Dict[str, torch.Tensor]:
    """Tensors ``data[key]`` of tp rank 0, delivered to every rank of ``tp_group``.

    On tp rank 0 ``data`` maps each key to a tensor of ``datatype`` (at most 5 dims); on the
    other ranks it is ignored (may be None), except on a fake-backend group, where every
    rank passes its own data and gets it back. Returns {key: tensor} on every rank, on the
    current GPU for NCCL and on CPU for gloo. ``tp_group=None`` means one rank: the data
    is returned as is.

    ``shapes`` ({key: shape}, known to every rank, e.g. [micro-batch, sequence]) skips the
    size broadcast, whose round trip through the host would wait for all queued GPU work
    each micro-batch; rank 0 checks its data against them. Rank 0's tensors go to the GPU
    with ``non_blocking`` copies, asynchronous when the data loader pinned them.
    """
    holds_data = group_rank(tp_group) == 0 or is_fake(tp_group)
    if holds_data:
        if data is None:
            raise ValueError("broadcast_data: tensor-parallel rank 0 (every rank of a fake-backend group) "
                             "must pass the data dict, got None")
        _check_data(keys, data, datatype)
        if shapes is not None:
            for key in keys:
                if tuple(data[key].shape) != tuple(shapes[key]):
                    raise ValueError(
                        f"broadcast_data: {key!r} has shape {tuple(data[key].shape)}, the other ranks expect "
                        f"{tuple(shapes[key])} (the micro-batch and sequence shape from the arguments)"
                    )
    if group_size(tp_group) == 1:
        return {key: data[key] for key in keys}
    device = comm_device(tp_group)
    src = dist.get_global_rank(tp_group, 0)
    if shapes is None:
        sizes = _broadcast_sizes(keys, data, tp_group, src, device, holds_data)
    else:
        sizes = [torch.Size(shapes[key]) for key in keys]
    numels = [size.numel() for size in sizes]
    if holds_data:
        flat = torch.cat([data[key].to(device, non_blocking=True).reshape(-1) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    dist.broadcast(flat, src, group=tp_group)
    output, offset = {}, 0
    for key, size, numel in zip(keys, sizes, numels):
        output[key] = flat.narrow(0, offset, numel).view(size)
        offset += numel
    return output
