"""Room for a checkpoint, checked before anything is written: a full disk otherwise
surfaces mid-write (with --async-save, iterations later) as an obscure serializer error."""

from __future__ import annotations

import shutil
from typing import Dict, Iterable, Optional, Tuple

from megatron.core.dist_checkpointing import ShardedTensor
from megatron.training.checkpointing.collectives import all_gather_objects
from megatron.training.checkpointing.directory import CheckpointError

# Metadata, pickled run state, RNG states and file headers on top of the tensor bytes.
OVERHEAD_FRACTION = 0.02
OVERHEAD_BYTES = 64 * 2**10


def _unique_bytes(chunks: Iterable[ShardedTensor]) -> Dict[Tuple[str, Tuple[int, ...]], int]:
    return {(c.key, tuple(c.global_offset)): c.data.numel() * c.data.element_size() for c in chunks}


def bytes_needed(chunks: Iterable[ShardedTensor], group) -> int:
    """Bytes the checkpoint's tensors take, counting each chunk once although data-parallel
    replicas all hold it (one of them writes it). Collective over ``group``."""
    merged: Dict[Tuple[str, Tuple[int, ...]], int] = {}
    for part in all_gather_objects(_unique_bytes(chunks), group):
        merged.update(part)
    total = sum(merged.values())
    return int(total * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES


def free_bytes(root: str) -> Optional[int]:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return None


def check_free_space(root: str, iteration: int, needed: int, free: Optional[int],
                     previous: Optional[int]) -> None:
    """Raise (on every rank: all pass the same numbers) when ``free`` is short of ``needed``."""
    if free is not None and free < needed:
        raise CheckpointError(
            f"saving the checkpoint of iteration {iteration} to {root} was refused before writing: it needs "
            f"about {needed / 2**20:.2f} MiB and the file system has {free / 2**20:.2f} MiB free. The previous "
            f"checkpoint ({'iteration ' + str(previous) if previous is not None else 'none'}) is untouched. "
            "Free space (--keep-last-checkpoints removes old checkpoints) or point --save elsewhere."
        )
