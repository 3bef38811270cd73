"""What a loader hands to a saver: a Megatron checkpoint or a Hugging Face model directory."""

from __future__ import annotations

from dataclasses import dataclass

from core_checkpoint import CoreCheckpoint
from families import Family


@dataclass
class CoreSource:
    """A Megatron checkpoint (any format, any layout) of ``family``."""

    checkpoint: CoreCheckpoint
    family: Family

    def describe(self) -> str:
        return self.checkpoint.describe()


@dataclass
class HFSource:
    """A Hugging Face model directory (``config.json`` + safetensors) of ``family``."""

    hf_dir: str
    config: dict
    family: Family

    def describe(self) -> str:
        return f"{self.hf_dir} (Hugging Face {self.config.get('model_type')})"
