"""Sharded, layout-independent checkpoints on top of torch.distributed.checkpoint."""

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import (
    Mismatch,
    compare_with_checkpoint,
    load_sharded,
    read_metadata,
    save_sharded,
)

__all__ = ["ShardedObject", "ShardedTensor", "Mismatch", "compare_with_checkpoint", "load_sharded",
           "read_metadata", "save_sharded"]
