"""Mamba-2 and hybrid (Mamba + attention + MLP/MoE) language models."""

from megatron.core.models.mamba.mamba_model import MambaModel

__all__ = ["MambaModel"]
