"""Save and load lists of ``ShardedTensor`` / ``ShardedObject`` through
torch.distributed.checkpoint (files ``__<rank>_<k>.distcp`` plus ``.metadata``).

Loading checks everything it can before reading a byte of tensor data: every requested
key exists, every global shape matches (or may differ, see ``allow_shape_mismatch``), so
a wrong checkpoint fails with the full list of differences and no weight touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.safe_metadata import SafeMetadataReader
from megatron.core.dist_checkpointing.planner import ShardedLoadPlanner, ShardedSavePlanner


def _uses_collectives(group) -> bool:
    return dist.is_available() and dist.is_initialized()


def save_sharded(tensors: Sequence[ShardedTensor], objects: Sequence[ShardedObject], directory: str,
                 group=None, before_write: Optional[Callable[[int], None]] = None,
                 thread_count: int = 1) -> None:
    """Write this rank's chunks and objects into ``directory`` (collective over ``group``,
    default the world). Files are fsynced before this returns on any rank."""
    writer = FileSystemWriter(directory, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
    planner = ShardedSavePlanner(tensors, objects, before_write)
    dcp.save({}, storage_writer=writer, planner=planner, process_group=group,
             no_dist=not _uses_collectives(group))


def read_metadata(directory: str) -> Metadata:
    """The ``.metadata`` of a checkpoint directory (global shapes and chunks of every key)."""
    return SafeMetadataReader(directory).read_metadata()


@dataclass
class Mismatch:
    """How the requested keys differ from a checkpoint's."""

    missing: List[str] = field(default_factory=list)
    wrong_shape: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.wrong_shape)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, entries in (("missing from the checkpoint", self.missing),
                               ("with another shape in the checkpoint", self.wrong_shape),
                               ("in the checkpoint but not in this model", self.unexpected)):
            if entries:
                shown = entries[:limit] + ([f"... and {len(entries) - limit} more"] if len(entries) > limit else [])
                lines.append(f"{len(entries)} key(s) {title}:\n    " + "\n    ".join(shown))
        return "\n".join(lines)


def compare_with_checkpoint(tensors: Sequence[ShardedTensor], objects: Sequence[ShardedObject],
                            metadata: Metadata, known_prefixes: Sequence[str] = ()) -> Mismatch:
    """Keys this rank asks for that the checkpoint lacks or holds with another shape.
    ``unexpected`` lists saved tensor keys starting with one of ``known_prefixes`` that
    nobody here asked for (only meaningful when ``tensors`` cover the whole model)."""
    saved = metadata.state_dict_metadata
    result = Mismatch()
    seen = set()
    for tensor in tensors:
        if tensor.key in seen:
            continue
        seen.add(tensor.key)
        entry = saved.get(tensor.key)
        if entry is None or isinstance(entry, BytesStorageMetadata):
            result.missing.append(f"{tensor.key} {tensor.global_shape}")
        elif tuple(entry.size) != tensor.global_shape and not tensor.allow_shape_mismatch:
            result.wrong_shape.append(f"{tensor.key}: checkpoint {tuple(entry.size)}, this model {tensor.global_shape}")
    for obj in objects:
        if not isinstance(saved.get(obj.key), BytesStorageMetadata):
            result.missing.append(obj.key)
    if known_prefixes:
        result.unexpected = sorted(
            f"{key} {tuple(entry.size)}" for key, entry in saved.items()
            if not isinstance(entry, BytesStorageMetadata) and key not in seen
            and any(key.startswith(p) for p in known_prefixes)
        )
    return result


def load_sharded(tensors: Sequence[ShardedTensor], objects: Sequence[ShardedObject], directory: str,
                 group=None) -> None:
    """Fill ``tensors`` in place and set ``objects[i].value`` from ``directory`` (collective
    over ``group``). Call ``compare_with_checkpoint`` first for a readable error."""
    planner = ShardedLoadPlanner(tensors, objects)
    dcp.load({}, storage_reader=SafeMetadataReader(directory), planner=planner, process_group=group,
             no_dist=not _uses_collectives(group))
