"""torch.distributed.checkpoint planners for ``ShardedTensor`` / ``ShardedObject`` lists.

DCP's default planners understand DTensor and torch's own ShardedTensor. Ours need
neither: every chunk already knows its global shape and offset, so the save plan is one
write item per chunk (replicas across ranks are written once, by DCP's de-duplication) and
the load plan asks, per chunk, for its overlap with the chunks in the checkpoint (DCP's
resharding helper). Values are read straight into the destination tensors.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.safe_unpickle import load_weights_only

ChunkKey = Tuple[str, Tuple[int, ...]]


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor


def _index_chunks(tensors: Sequence[ShardedTensor]) -> Dict[ChunkKey, ShardedTensor]:
    chunks: Dict[ChunkKey, ShardedTensor] = {}
    for tensor in tensors:
        index = (tensor.key, tensor.global_offset)
        if index in chunks:
            raise ValueError(f"sharded tensor {tensor.key!r}: two chunks at offset {tensor.global_offset} on one rank")
        chunks[index] = tensor
    return chunks


class ShardedSavePlanner(DefaultSavePlanner):
    """Writes each ``ShardedTensor`` as one chunk and each ``ShardedObject`` as bytes.

    ``before_write(n)`` is called before the n-th item is handed to the writer (a hook for
    crash tests: a process killed there leaves a partly written data file).
    """

    def __init__(self, tensors: Sequence[ShardedTensor], objects: Sequence[ShardedObject],
                 before_write: Optional[Callable[[int], None]] = None) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = _index_chunks(tensors)
        self._objects = {obj.key: obj for obj in objects}
        if len(self._objects) != len(objects):
            raise ValueError("two sharded objects with the same key on one rank")
        self._before_write = before_write
        self._written = 0

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items: List[WriteItem] = []
        for (key, offset), chunk in self._chunks.items():
            offsets = torch.Size(offset)
            items.append(WriteItem(
                index=MetadataIndex(key, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.local_shape)),
                    properties=TensorProperties.create_from_tensor(chunk.data),
                    size=torch.Size(chunk.global_shape),
                ),
            ))
        for key in self._objects:
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if self._before_write is not None:
            self._before_write(self._written)
        self._written += 1
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(self._objects[write_item.index.fqn].value, buffer)
            buffer.seek(0)
            return buffer
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        return chunk.data.detach().contiguous()


def requested_chunk(tensor: ShardedTensor, saved: TensorStorageMetadata) -> Tuple[ChunkStorageMetadata, torch.Tensor]:
    """The region of ``tensor`` to read from a saved tensor and the view it lands in: all
    of it, or with ``allow_shape_mismatch`` its overlap with the saved global shape."""
    offsets, sizes = list(tensor.global_offset), list(tensor.local_shape)
    if tuple(saved.size) != tensor.global_shape:
        if not tensor.allow_shape_mismatch:
            raise ValueError(f"{tensor.key}: saved shape {tuple(saved.size)} != {tensor.global_shape}")
        sizes = [max(0, min(o + s, limit) - o) for o, s, limit in zip(offsets, sizes, saved.size)]
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), _narrow(tensor.data, [0] * len(sizes), sizes)


class ShardedLoadPlanner(DefaultLoadPlanner):
    """Reads each requested chunk from whatever saved chunks overlap it."""

    def __init__(self, tensors: Sequence[ShardedTensor], objects: Sequence[ShardedObject]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = _index_chunks(tensors)
        self._objects = {obj.key: obj for obj in objects}
        self._destinations: Dict[ChunkKey, torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata: Optional[Metadata] = None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        by_key: Dict[str, List[ShardedTensor]] = defaultdict(list)
        for (key, _), chunk in self._chunks.items():
            by_key[key].append(chunk)
        items: List[ReadItem] = []
        for key, chunks in by_key.items():
            wanted = []
            for chunk in chunks:
                region, view = requested_chunk(chunk, saved[key])
                if any(size == 0 for size in region.sizes):
                    continue  # nothing of this chunk exists in the saved (smaller) tensor
                self._destinations[(key, tuple(region.offsets))] = view
                wanted.append(region)
            items.extend(create_read_items_for_chunk_list(key, saved[key], wanted))
        for key in self._objects:
            index = MetadataIndex(key)
            zero = torch.Size([0])
            items.append(ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero))
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._destinations[(index.fqn, tuple(index.offset))]

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return _narrow(self.lookup_tensor(read_item.dest_index), read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The reader copied into our view of the destination: nothing left to do."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Weights-only: a checkpoint directory may come from anywhere, its objects must not run code.
        self._objects[read_item.dest_index.fqn].value = load_weights_only(value)
