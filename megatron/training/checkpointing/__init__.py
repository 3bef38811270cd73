"""Checkpoints: Megatron's directory layout and flags, crash-safe, verified, reshardable."""

from megatron.training.checkpointing.api import load_checkpoint, save_checkpoint, wait_for_pending_save
from megatron.training.checkpointing.directory import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "wait_for_pending_save"]
