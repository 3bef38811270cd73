"""The aux-loss-free expert-bias step of every MoE router, run once per iteration."""

from __future__ import annotations

from typing import Iterable

import torch


def update_router_expert_bias(model_chunks: Iterable[torch.nn.Module], dp_group=None) -> None:
    """Update the expert bias of every router that has one, from the iteration's token
    counts summed over ``dp_group`` (collective: every data-parallel rank must call it)."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if getattr(module, "expert_bias", None) is not None and hasattr(module, "update_expert_bias"):
                module.update_expert_bias(dp_group)
