"""``TopKRouter``: gating linear, score function, top-k selection, balancing losses,
capacity, and the aux-loss-free expert bias.

Input tokens [T, h] -> (probs [T, E] zero outside each token's experts, routing_map
[T, E] bool). The balancing losses are not returned: they are attached to the probs
with ``MoEAuxLossAutoScaler`` (so they enter the backward pass) and recorded in the
MoE metrics tracker for logging.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_size
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    scores_for_aux_loss,
    sequence_load_balancing_loss_func,
    sinkhorn,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)

_ROUTER_DTYPES = {None: None, "fp32": torch.float32, "fp64": torch.float64}


class _RandomLogits(torch.autograd.Function):
    """--moe-router-force-load-balancing: standard-normal logits of the same shape in the
    forward (drawn from the default generator, so seeded runs repeat), the incoming gradient
    unchanged in the backward (straight through to the router's own logits)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sum_token_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Forward: sum of the per-expert token counts [E] over ``group`` (the ranks that
    hold parts of the same sequences, under sequence parallelism). Backward: not
    differentiable (counts). Returns ``counts`` itself for a 1-rank group."""
    if group is None or group_size(group) == 1:
        return counts
    total = counts.clone()
    dist.all_reduce(total, group=group)
    return total


class TopKRouter(torch.nn.Module):
    """Router of one MoE layer. ``weight`` [E, h] (Megatron's ``mlp.router.weight``);
    ``bias`` [E] unless --disable-bias-linear; ``expert_bias`` [E] buffer with
    --moe-router-enable-expert-bias.

    ``sequence_group``: the ranks whose tokens are parts of the same sequences (the
    tensor-parallel group under --sequence-parallel), over which token counts are summed
    so that the balancing loss is that of the whole sequence. ``seq_length`` and
    ``batch_size`` of the [s, b] token grid are passed to ``forward`` for seq_aux_loss.
    """

    def __init__(self, config, layer_number: int, sequence_group=None):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.sequence_group = sequence_group
        self.weight = torch.nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            with torch.no_grad():
                master = torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32)
                config.init_method(master)
                self.weight.copy_(master)
        # Replicated over tensor-parallel ranks; with sequence parallelism each rank sees
        # only its tokens, so the weight's gradient must be summed over them.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        # As in Megatron-LM, the router has a bias (zeros at init) when the linears do
        # (gpt-oss's router); --disable-bias-linear drops it.
        self.bias = None
        if config.add_bias_linear:
            self.bias = torch.nn.Parameter(torch.zeros(self.num_experts, dtype=config.params_dtype))
            setattr(self.bias, "sequence_parallel", bool(config.sequence_parallel))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                                 persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None

    def gating(self, tokens: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E], in --moe-router-dtype when given."""
        dtype = _ROUTER_DTYPES[self.config.moe_router_dtype]
        dtype = tokens.dtype if dtype is None else dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(tokens.to(dtype), self.weight.to(dtype), bias)

    def _jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        eps = self.config.moe_input_jitter_eps
        if eps is None or not self.training:
            return tokens
        noise = torch.empty_like(tokens).uniform_(1.0 - eps, 1.0 + eps)
        return tokens * noise

    def _num_layers(self) -> int:
        # Multi-token prediction layers are numbered after the decoder's.
        return self.config.num_layers + (getattr(self.config, "mtp_num_layers", None) or 0)

    def _attach(self, activation: torch.Tensor, loss: torch.Tensor, name: str, coeff: float) -> torch.Tensor:
        """Add ``loss`` to the backward through ``activation``; record loss / coeff."""
        if self.training and torch.is_grad_enabled():
            activation = MoEAuxLossAutoScaler.apply(activation, loss)
            get_moe_metrics_tracker().record(name, loss / coeff, self.layer_number, self._num_layers(), self.sequence_group)
        return activation

    def _z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        coeff = self.config.moe_z_loss_coeff
        if not coeff:
            return logits
        # Each rank of the sequence group averages over its share of the tokens.
        local_coeff = coeff / max(1, group_size(self.sequence_group))
        return self._attach(logits, z_loss_func(logits, local_coeff), "z_loss", coeff)

    def _route(self, logits: torch.Tensor):
        c = self.config
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=c.moe_router_pre_softmax, num_groups=c.moe_router_num_groups,
            group_topk=c.moe_router_group_topk, scaling_factor=c.moe_router_topk_scaling_factor,
            score_function=c.moe_router_score_function, expert_bias=self.expert_bias,
        )

    def _sinkhorn(self, logits: torch.Tensor):
        if self.training:
            with torch.no_grad():
                indices = torch.topk(sinkhorn(logits.float()), k=self.topk, dim=1)[1]
            scores = torch.sigmoid(logits) if self.topk == 1 else torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits) if self.topk == 1 else torch.softmax(logits, dim=-1, dtype=torch.float32)
            indices = torch.topk(scores, k=self.topk, dim=1)[1]
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        return (scores * routing_map).type_as(logits), routing_map

    def _balancing(self, logits: torch.Tensor, probs: torch.Tensor, seq_length: int, batch_size: int):
        kind, coeff = self.config.moe_router_load_balancing_type, self.config.moe_aux_loss_coeff
        if kind not in ("aux_loss", "seq_aux_loss") or not coeff:
            return probs
        aux_map, scores = scores_for_aux_loss(logits, self.topk, self.config.moe_router_score_function)
        if kind == "aux_loss":
            counts = sum_token_counts(aux_map.sum(dim=0).float(), self.sequence_group)
            total_tokens = logits.size(0) * max(1, group_size(self.sequence_group))
            loss = switch_load_balancing_loss_func(scores, counts, total_tokens, self.topk, coeff)
            return self._attach(probs, loss, "load_balancing_loss", coeff)
        if group_size(self.sequence_group) > 1:
            raise ValueError(
                "--moe-router-load-balancing-type seq_aux_loss with --sequence-parallel is not supported: "
                "use aux_loss, or drop --sequence-parallel"
            )
        loss = sequence_load_balancing_loss_func(scores, aux_map, seq_length, batch_size, self.topk, coeff)
        return self._attach(probs, loss, "seq_load_balancing_loss", coeff)

    def forward(self, tokens: torch.Tensor, seq_length: Optional[int] = None, batch_size: int = 1):
        """tokens [T, h] (T = seq_length * batch_size, sequence first) -> (probs, routing_map)."""
        seq_length = tokens.size(0) // batch_size if seq_length is None else seq_length
        logits = self._z_loss(self.gating(self._jitter(tokens)))
        if self.config.moe_router_force_load_balancing:
            logits = _RandomLogits.apply(logits)
        if self.config.moe_router_load_balancing_type == "sinkhorn":
            probs, routing_map = self._sinkhorn(logits)
        else:
            probs, routing_map = self._route(logits)
            probs = self._balancing(logits, probs, seq_length, batch_size)
        c = self.config
        if c.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, self.topk, c.moe_expert_capacity_factor, c.moe_token_drop_policy,
                c.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled():
            counts = sum_token_counts(routing_map.sum(dim=0).float(), self.sequence_group)
            get_moe_metrics_tracker().record_tokens(self.layer_number, counts)
            if self.local_tokens_per_expert is not None:
                self.local_tokens_per_expert += counts
        return probs, routing_map

    @torch.no_grad()
    def update_expert_bias(self, dp_group=None) -> None:
        """Aux-loss-free balancing step: bias += rate * sign(mean count - count), with the
        counts of the finished iteration summed over ``dp_group``; then reset the counts."""
        if self.expert_bias is None:
            return
        counts = sum_token_counts(self.local_tokens_per_expert, dp_group)
        offset = counts.mean() - counts
        self.expert_bias += torch.sign(offset) * self.config.moe_router_bias_update_rate
        self.local_tokens_per_expert.zero_()
