"""Sharded, layout-independent checkpoints on top of torch.distributed.checkpoint."""

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import (
    Mismatch,
    compare_with_checkpoint,
    load_sharded,
    read_metadata,
    save_sharded,
)
from megatron.core.dist_checkpointing.state_dict_api import load, save

__all__ = ["load", "save", "ShardedObject", "ShardedTensor", "Mismatch", "compare_with_checkpoint", "load_sharded",
           "read_metadata", "save_sharded"]
