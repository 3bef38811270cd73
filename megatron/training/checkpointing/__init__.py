"""Checkpoints: Megatron's directory layout and flags, crash-safe, verified, reshardable."""

from megatron.training.checkpointing.api import (
    check_save_directory,
    convert_checkpoint_format,
    load_checkpoint,
    save_checkpoint,
    wait_for_pending_save,
)
from megatron.training.checkpointing.directory import CheckpointError

__all__ = ["CheckpointError", "check_save_directory", "convert_checkpoint_format", "load_checkpoint", "save_checkpoint", "wait_for_pending_save"]
