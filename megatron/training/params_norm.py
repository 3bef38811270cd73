"""--log-params-norm: the L2 norm of all model weights, each counted once over the whole
model-parallel grid (Megatron's "params norm" in the iteration line)."""

from __future__ import annotations

from typing import List

import torch

from megatron.core.optimizer.clip_grads import (
    combined_grad_norm,
    param_is_not_shared,
    param_is_not_tensor_parallel_duplicate,
)
from megatron.core.process_groups import ProcessGroups


def params_l2_norm(model: List[torch.nn.Module], pg: ProcessGroups) -> float:
    """Norm of the weights as the model holds them (bf16 under --bf16), computed in fp32.

    Dense weights sum over tensor x pipeline ranks (tensor-parallel replicas such as
    layernorm weights counted on tp rank 0, tied/shared copies once); expert weights sum
    over expert-tp x expert x pipeline ranks. Data-parallel and context-parallel ranks hold
    the same weights and are not summed. With --overlap-param-gather the caller must have
    finished the gather of the updated weights first. Under FSDP2 each data x context
    parallel rank holds a shard of every weight (fp32): the shards are summed over those
    ranks too.
    """
    dense, experts = [], []
    sharded = False
    for chunk in model:
        for param in chunk.parameters():
            if not param_is_not_shared(param):
                continue
            if getattr(param, "allreduce", True):
                if param_is_not_tensor_parallel_duplicate(param, pg.tp):
                    sharded = sharded or hasattr(param, "to_local")
                    dense.append(param.detach().to_local() if hasattr(param, "to_local") else param.detach())
            elif param_is_not_tensor_parallel_duplicate(param, pg.expt_tp):
                experts.append(param.detach())
    return combined_grad_norm((dense, (pg.dp_cp, pg.mp) if sharded else pg.mp), (experts, pg.tp_ep_pp))
