"""The small collectives a checkpoint needs, on a dedicated gloo group.

A separate group keeps checkpoint traffic (which may run in a background thread with
--async-save) apart from training's NCCL or gloo groups, and works on CPU objects."""

from __future__ import annotations

from typing import Any, List, Optional

import torch.distributed as dist

_GROUP = None


def checkpoint_group():
    """The gloo group over all ranks (created collectively on first use), or None
    without torch.distributed."""
    global _GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo")
    return _GROUP


def reset_checkpoint_group() -> None:
    global _GROUP
    _GROUP = None


def rank_and_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(value: Any, group=None) -> List[Any]:
    group = group if group is not None else checkpoint_group()
    if group is None:
        return [value]
    out: List[Optional[Any]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def broadcast_from_rank0(value: Any, group=None) -> Any:
    group = group if group is not None else checkpoint_group()
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group=None) -> None:
    group = group if group is not None else checkpoint_group()
    if group is not None:
        dist.barrier(group=group)
