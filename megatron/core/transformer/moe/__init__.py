"""Mixture of experts: router, token dispatchers, experts, shared experts, the MoE layer."""

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_layer_pattern import is_moe_layer, moe_layer_pattern

__all__ = ["MoELayer", "is_moe_layer", "moe_layer_pattern"]
