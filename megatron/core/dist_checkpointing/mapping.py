"""What a rank contributes to a sharded checkpoint: tensor chunks and small objects.

A ``ShardedTensor`` is one rectangular chunk of a logical (global) tensor: this rank's
``data`` sits at ``global_offset`` inside a tensor of ``global_shape`` stored under
``key``. Keys and global shapes do not depend on the parallel layout, so a checkpoint
written by one layout is read by any other: each reader asks for the chunks it holds and
the storage layer returns their overlap with the chunks that were written. Several ranks
may offer the same chunk (data-parallel replicas); it is written once.

A ``ShardedObject`` is a picklable value stored whole under ``key`` (common state, a
rank's RNG state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Tuple

import torch


@dataclass
class ShardedTensor:
    """One chunk of the global tensor ``key``.

    ``data`` is written on save and filled in place on load (it may be a view of a live
    parameter or optimizer state). ``allow_shape_mismatch``: on load, a saved tensor with
    another global shape is read where the two overlap and the rest of ``data`` is left as
    it is (padded vocabularies differ between tensor-parallel sizes).
    """

    key: str
    data: torch.Tensor
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]
    allow_shape_mismatch: bool = False

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(s) for s in self.global_shape)
        self.global_offset = tuple(int(o) for o in self.global_offset)
        if len(self.global_shape) != self.data.dim() or len(self.global_offset) != self.data.dim():
            raise ValueError(
                f"sharded tensor {self.key!r}: local shape {tuple(self.data.shape)}, global shape "
                f"{self.global_shape} and offset {self.global_offset} must have the same number of dims"
            )
        for dim, (size, offset, total) in enumerate(zip(self.data.shape, self.global_offset, self.global_shape)):
            if offset < 0 or offset + size > total:
                raise ValueError(
                    f"sharded tensor {self.key!r}: chunk of size {size} at offset {offset} does not fit "
                    f"in dim {dim} of global shape {self.global_shape}"
                )

    @property
    def local_shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)

    @classmethod
    def whole(cls, key: str, data: torch.Tensor, allow_shape_mismatch: bool = False) -> "ShardedTensor":
        """A tensor every holder has in full (replicated)."""
        return cls(key, data, tuple(data.shape), (0,) * data.dim(), allow_shape_mismatch)

    @classmethod
    def from_rank_offsets(cls, key: str, data: torch.Tensor, *rank_offsets: Tuple[int, int, int],
                          replica_id=0, prepend_axis_num: int = 0, allow_shape_mismatch: bool = False,
                          **_unused) -> "ShardedTensor":
        """Megatron-Core's constructor: each ``(axis, rank_along_axis, fragments)`` says
        ``data`` is piece ``rank_along_axis`` of ``fragments`` equal pieces along ``axis``.
        ``replica_id`` is not needed here (identical chunks are written once);
        ``prepend_axis_num`` adds leading axes of size 1."""
        del replica_id
        for _ in range(prepend_axis_num):
            data = data.unsqueeze(0)
        shape, offset = list(data.shape), [0] * data.dim()
        for axis, rank, fragments in rank_offsets:
            if not 0 <= rank < fragments:
                raise ValueError(f"sharded tensor {key!r}: rank offset {rank} along axis {axis} is outside 0..{fragments - 1}")
            offset[axis] = rank * data.shape[axis]
            shape[axis] = fragments * data.shape[axis]
        return cls(key, data, tuple(shape), tuple(offset), allow_shape_mismatch)


@dataclass
class ShardedObject:
    """A picklable value stored whole under ``key``; ``value`` is replaced on load."""

    key: str
    value: Any = field(default=None)
