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


@dataclass
class ShardedObject:
    """A picklable value stored whole under ``key``; ``value`` is replaced on load."""

    key: str
    value: Any = field(default=None)
