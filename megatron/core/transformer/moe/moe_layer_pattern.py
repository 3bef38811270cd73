"""Which transformer layers are MoE layers (--moe-layer-freq)."""

from __future__ import annotations

from typing import List, Sequence, Union


def moe_layer_pattern(num_layers: int, moe_layer_freq: Union[int, Sequence[int]]) -> List[bool]:
    """One bool per layer (0-based): True where the MLP is an MoE layer.

    An integer N makes layers 0, N, 2N, ... MoE (Megatron's rule, so 1 means every
    layer); a list gives 1 (MoE) or 0 (dense) per layer and must have ``num_layers`` entries.
    """
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ValueError(f"--moe-layer-freq must be >= 1, got {moe_layer_freq}: use 1 for MoE in every layer")
        return [i % moe_layer_freq == 0 for i in range(num_layers)]
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers or any(v not in (0, 1) for v in pattern):
        raise ValueError(
            f"--moe-layer-freq pattern {pattern} must have one 0/1 entry per layer (--num-layers "
            f"{num_layers}): e.g. ([1]*3+[0])*2 for six layers"
        )
    return [bool(v) for v in pattern]


def is_moe_layer(config, layer_number: int) -> bool:
    """Whether global, 1-based ``layer_number`` of ``config`` has an MoE MLP. Numbers past
    --num-layers are multi-token prediction layers, which follow the decoder's last layer."""
    if not getattr(config, "num_moe_experts", None):
        return False
    pattern = moe_layer_pattern(config.num_layers, config.moe_layer_freq)
    return pattern[min(layer_number, len(pattern)) - 1]
