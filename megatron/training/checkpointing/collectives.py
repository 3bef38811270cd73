"""The small collectives a checkpoint needs, over a group the caller passes in.

``CheckpointComm.open()`` is called once by each entry point (save, load, the --save
check): it makes a dedicated gloo group over all ranks, which keeps checkpoint traffic
(which may run in a background thread with --async-save) apart from training's NCCL or
gloo groups and works on CPU objects. The entry point closes it when its work is done.
Every collective below takes that group explicitly; ``group=None`` means one process
without torch.distributed (the collective is then the identity), never a default group.
None of them carries gradients: they move Python objects, not autograd tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class CheckpointComm:
    """This rank, the number of ranks, and the gloo group (None in a single process
    without torch.distributed) over which one save or load talks."""

    rank: int
    world: int
    group: Optional[Any]

    @classmethod
    def open(cls) -> "CheckpointComm":
        """A new gloo group over all ranks; collective (every rank calls it, in the same order)."""
        if not _distributed():
            return cls(rank=0, world=1, group=None)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), group=dist.new_group(backend="gloo"))

    def close(self) -> None:
        """Release the group's connections (local: no rank waits for another). Call it
        only after this rank's last collective on the group."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def all_gather_objects(value: Any, group) -> List[Any]:
    """Forward: every rank of ``group`` gets the list of all ranks' ``value`` (by rank);
    ``[value]`` without torch.distributed. Backward: none (pickled objects)."""
    if group is None:
        return [value]
    out: List[Optional[Any]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def broadcast_from_rank0(value: Any, group) -> Any:
    """Forward: every rank of ``group`` gets rank 0's ``value`` (the others pass anything,
    usually None); ``value`` itself without torch.distributed. Backward: none (pickled objects)."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier(group) -> None:
    """Forward: returns once every rank of ``group`` has reached it; nothing without
    torch.distributed. Backward: none."""
    if group is not None:
        dist.barrier(group=group)


def exchange_bytes(sends: Dict[int, bytes], receives: Dict[int, int], group) -> Dict[int, bytes]:
    """Forward: point-to-point over ``group`` (whose ranks are the global ranks: a
    ``CheckpointComm`` group): this rank sends ``sends[dst]`` to each ``dst`` and receives
    ``receives[src]`` bytes from each ``src``; returns ``{src: bytes}``. Every send must be
    matched by the receiving rank's entry of the same size (callers agree on the sizes
    first, with ``all_gather_objects``). All transfers are posted before any is waited for,
    so ranks that exchange with each other do not deadlock. Backward: none (bytes)."""
    if group is None:
        if sends or receives:
            raise ValueError("exchange_bytes needs torch.distributed: there are no peers in a single process")
        return {}
    buffers = {src: torch.empty(size, dtype=torch.uint8) for src, size in receives.items()}
    works = [dist.irecv(buffer, src=src, group=group) for src, buffer in sorted(buffers.items())]
    for dst, data in sorted(sends.items()):
        works.append(dist.isend(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=group))
    for work in works:
        work.wait()
    return {src: buffer.numpy().tobytes() for src, buffer in buffers.items()}
