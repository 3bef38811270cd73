"""``MoELayer``: router -> token dispatch -> experts -> combine (+ shared experts).

Replaces the MLP of a transformer layer (see ``moe_layer_pattern``). Tokens are the
[s, b] grid of the layer input flattened sequence-first.

Tensor parallelism without sequence parallelism: the layer input is replicated over the
tensor-parallel ranks, so routing (and capacity, and the balancing losses) is computed
on all tokens by every rank, identically; then each rank keeps 1/tp of the tokens (with
their probs and routes) for the dispatch, and the outputs are all-gathered again. The
result does not depend on the tensor-parallel size. With --sequence-parallel each rank
routes its own s/tp tokens (capacity per rank, as Megatron does).

With --moe-apply-probs-on-input the tokens are scaled by their (top-1) prob right after
routing and the dispatchers combine with unit weights (``apply_probs_on_input``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import process_groups
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.experts import build_experts
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.moe.token_dispatcher import build_token_dispatcher


def apply_probs_on_input(tokens: torch.Tensor, probs: torch.Tensor):
    """--moe-apply-probs-on-input (top-1 routing): each token [T, h] scaled by the prob of
    its one expert, the product cast back to the tokens' dtype, and all-ones probs for the
    combine, which then sums the experts' outputs unweighted. ``probs`` [T, E] is zero
    outside a token's expert, so its row sum is that prob (no host read). The router gets
    its gradient through the scaled input."""
    token_probs = probs.sum(dim=1, keepdim=True)
    scaled = (token_probs * tokens).to(tokens.dtype)
    return scaled, torch.ones_like(probs)


class MoELayer(torch.nn.Module):
    """forward(hidden_states [s(/tp), b, h]) -> (output [s(/tp), b, h], None).

    Submodules (Megatron's names): ``router``, ``experts`` (``local_experts.{i}`` for this
    rank's experts ep_rank * E/EP + i), ``shared_experts`` when configured.
    """

    def __init__(self, config, layer_number: int = 1, pg_collection: Optional[process_groups.ProcessGroups] = None):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        groups = process_groups.resolve(pg_collection)
        self.tp_group = groups.tp
        self.tp_size = group_size(groups.tp)
        self.split_replicated_tokens = self.tp_size > 1 and not config.sequence_parallel
        ep_size, ep_rank = group_size(groups.ep), group_rank(groups.ep)
        if config.num_moe_experts % ep_size:
            raise ValueError(
                f"--num-experts {config.num_moe_experts} is not divisible by the expert-parallel size {ep_size}"
            )
        num_local = config.num_moe_experts // ep_size
        self.local_expert_indices = list(range(ep_rank * num_local, (ep_rank + 1) * num_local))
        self.router = TopKRouter(config, layer_number, sequence_group=groups.tp if config.sequence_parallel else None)
        self.experts = build_experts(config, layer_number, self.local_expert_indices, groups.expt_tp)
        self.token_dispatcher = build_token_dispatcher(config, self.local_expert_indices, groups)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = SharedExpertMLP(config, pg_collection=groups)

    def _local_share(self, tokens, probs, routing_map):
        """This tensor-parallel rank's block of the (replicated) tokens, probs and routes."""
        if tokens.size(0) % self.tp_size:
            raise ValueError(
                f"an MoE layer with --tensor-model-parallel-size {self.tp_size} splits the "
                f"{tokens.size(0)} tokens of a micro-batch (seq length x micro batch size) over "
                "tensor-parallel ranks: make that number divisible, or add --sequence-parallel"
            )
        rank = group_rank(self.tp_group)
        return (
            scatter_to_sequence_parallel_region(tokens, self.tp_group),
            scatter_to_sequence_parallel_region(probs, self.tp_group),
            routing_map.chunk(self.tp_size, dim=0)[rank],
        )

    def routed_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The routed experts' combined output [s(/tp), b, h] (no shared experts)."""
        s, b, h = hidden_states.shape
        tokens = hidden_states.reshape(s * b, h)
        probs, routing_map = self.router(tokens, seq_length=s, batch_size=b)
        if self.config.moe_apply_probs_on_input:
            tokens, probs = apply_probs_on_input(tokens, probs)
        if self.split_replicated_tokens:
            tokens, probs, routing_map = self._local_share(tokens, probs, routing_map)
        expert_input, tokens_per_expert, state = self.token_dispatcher.dispatch(tokens, probs, routing_map)
        expert_output = self.experts(expert_input, tokens_per_expert)
        output = self.token_dispatcher.combine(expert_output, state)
        if self.split_replicated_tokens:
            output = gather_from_sequence_parallel_region(output, self.tp_group, tensor_parallel_output_grad=False)
        return output.view(s, b, h)

    def forward(self, hidden_states: torch.Tensor):
        output = self.routed_experts(hidden_states)
        if self.shared_experts is not None:
            shared, bias = self.shared_experts(hidden_states)
            output = output + shared if bias is None else output + shared + bias
        return output, None
