"""MoE balancing losses and token counts for the iteration log, as Megatron reports them.

Each balancing loss enabled by the flags becomes a key of the iteration's losses, next to
``lm loss``: its value is the recorded (coefficient-free) loss summed over the MoE layers'
micro-batches, scaled by 1/num_microbatches, averaged over data-parallel ranks and over
the MoE layers. With --moe-per-layer-logging the per-layer values (and the per-layer
token counts of each expert) also go to the TensorBoard/W&B writers.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern
from megatron.core.transformer.moe.moe_logging import (
    get_moe_metrics_tracker,
    reduce_moe_metrics,
    reduce_tokens_per_expert,
)


def moe_loss_names(args) -> List[str]:
    """The tracked loss names, in Megatron's order."""
    kind = args.moe_router_load_balancing_type
    names = []
    if kind == "aux_loss":
        names.append("load_balancing_loss")
    if kind == "seq_aux_loss":
        names.append("seq_load_balancing_loss")
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def collect_moe_metrics(args, pg) -> Dict[str, object]:
    """Reduce and clear this iteration's MoE metrics (collective over pp and dp ranks).

    Returns {"losses": {name: 0-d tensor}, "per_layer": {scalar name: float}}.
    """
    pattern = moe_layer_pattern(args.num_layers, args.moe_layer_freq)
    # Multi-token prediction layers come after the decoder's and are MoE when its last layer is.
    pattern = pattern + pattern[-1:] * (args.mtp_num_layers or 0)
    num_layers = len(pattern)
    num_moe_layers = max(1, sum(pattern))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    names = moe_loss_names(args)
    per_layer_values = reduce_moe_metrics(names, num_layers, pg.pp, pg.dp_cp, device=device)
    scale = 1.0 / get_num_microbatches()
    losses, per_layer = {}, {}
    for name, values in per_layer_values.items():
        values = values * scale
        losses[name] = values.sum() / num_moe_layers
        if args.moe_per_layer_logging:
            for layer, value in enumerate(values.tolist()):
                if pattern[layer]:
                    per_layer[f"moe/{name}_layer_{layer}"] = value
    if args.moe_per_layer_logging:
        table = reduce_tokens_per_expert(num_layers, args.num_experts, pg.pp, pg.dp_cp, device=device)
        for layer, counts in enumerate(table.tolist()):
            if pattern[layer]:
                for expert, count in enumerate(counts):
                    per_layer[f"moe/tokens_per_expert_layer_{layer}_expert_{expert}"] = count
    get_moe_metrics_tracker().clear()
    return {"losses": losses, "per_layer": per_layer}
