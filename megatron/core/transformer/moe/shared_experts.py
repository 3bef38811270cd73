"""Shared experts (DeepSeek-style): a dense MLP every token goes through, added to the
routed experts' output (--moe-shared-expert-intermediate-size).

With --moe-shared-expert-gate (Qwen2-MoE style) the shared expert's output is scaled per
token by sigmoid(x @ gate_weight^T), ``gate_weight`` [1, h] (Megatron's name and shape, so
checkpoints match). The gate is replicated over tensor-parallel ranks like the router.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.transformer.mlp import MLP


class SharedExpertMLP(MLP):
    """An ``MLP`` of width --moe-shared-expert-intermediate-size, split over the dense
    tensor-parallel group like any MLP. forward(hidden [s(/tp), b, h]) -> (out, bias);
    with the gate, out and bias are both scaled by the gate (the bias is added per token
    inside the gated term, so it cannot be returned unscaled)."""

    def __init__(self, config, pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__(config, pg_collection=pg_collection, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
        self.gate_weight = None
        if config.moe_shared_expert_gate:
            # Drawn after fc1/fc2, as in Megatron, so the other weights do not depend on the flag.
            self.gate_weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
            if config.perform_initialization:
                with torch.no_grad():
                    master = torch.empty(1, config.hidden_size, dtype=torch.float32)
                    config.init_method(master)
                    self.gate_weight.copy_(master)
            # Replicated; with sequence parallelism each rank gates only its own tokens, so
            # the gradient must be summed over the tensor-parallel ranks.
            setattr(self.gate_weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, hidden_states: torch.Tensor):
        output, bias = super().forward(hidden_states)
        if self.gate_weight is None:
            return output, bias
        if bias is not None:
            output = output + bias
        gate = torch.sigmoid(torch.nn.functional.linear(hidden_states, self.gate_weight))
        return output * gate, None
