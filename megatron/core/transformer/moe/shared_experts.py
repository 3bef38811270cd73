"""Shared experts (DeepSeek-style): a dense MLP every token goes through, added to the
routed experts' output (--moe-shared-expert-intermediate-size)."""

from __future__ import annotations

from typing import Optional

from megatron.core import process_groups
from megatron.core.transformer.mlp import MLP


class SharedExpertMLP(MLP):
    """An ``MLP`` of width --moe-shared-expert-intermediate-size, split over the dense
    tensor-parallel group like any MLP. forward(hidden [s(/tp), b, h]) -> (out, bias)."""

    def __init__(self, config, pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__(config, pg_collection=pg_collection, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
