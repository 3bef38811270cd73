"""Routing math of the MoE router: scores, top-k, balancing losses, capacity and token
dropping, and the autograd hook that adds auxiliary losses to the backward pass.

Shapes: ``logits``/``scores``/``probs`` are [T, E] (T tokens of this rank, E experts);
``routing_map`` is a bool [T, E] with True where a token goes to an expert.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megatron.core.transformer.aux_loss_scale import current_auxiliary_loss_scale


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Forward: return ``output`` unchanged (keeping ``aux_loss`` alive). Backward: pass
    the output's gradient through and give ``aux_loss`` the gradient of the main loss's scale.

    This adds ``scale * aux_loss`` to the objective without changing what the model
    returns. The scale is the one the schedule applies to the main loss (1 / number of
    micro-batches, x cp size; 1 with per-token loss), which the schedule hands over through
    ``aux_loss_scale.auxiliary_loss_scale`` around each forward step and which is read here
    at forward time. Outside a schedule, the scale given to ``set_loss_scale``
    (Megatron-Core's call) applies, else 1.
    """

    main_loss_backward_scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = current_auxiliary_loss_scale()
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        if ctx.scale is not None:
            # A Python float: building a tensor of it would be a blocking host-to-device copy.
            return grad_output, torch.full_like(aux_loss, ctx.scale)
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if scale is None:
            return grad_output, torch.ones_like(aux_loss)
        return grad_output, torch.ones_like(aux_loss) * scale.to(aux_loss.device)

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        """The gradient given to auxiliary losses computed outside a schedule's forward step
        (a schedule's own scale always wins)."""
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale.detach().clone().reshape(())


def switch_load_balancing_loss_func(
    probs: torch.Tensor, tokens_per_expert: torch.Tensor, total_num_tokens: int, topk: int, coeff: float
) -> torch.Tensor:
    """Switch-Transformer balancing loss: E * sum_i f_i * P_i * coeff.

    f_i = tokens_per_expert[i] / (T * topk) (fraction of routed slots; counts may be summed
    over ranks that share the sequence, with ``total_num_tokens`` the matching T);
    P_i = sum of this rank's probs[:, i] / T. Summing the per-rank values over such ranks
    gives the loss of the whole sequence.
    """
    num_experts = probs.size(-1)
    aggregated = probs.sum(dim=0)
    scale = num_experts * coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(aggregated * tokens_per_expert.to(aggregated.dtype)) * scale


def sequence_load_balancing_loss_func(
    probs: torch.Tensor, routing_map: torch.Tensor, seq_length: int, batch_size: int, topk: int, coeff: float
) -> torch.Tensor:
    """The balancing loss per sequence, averaged over the ``batch_size`` sequences.

    Tokens are ordered [s, b] (sequence first), so row s*b + j is position s of sequence j.
    """
    num_experts = probs.size(-1)
    per_seq_probs = probs.reshape(seq_length, batch_size * num_experts)
    per_seq_tokens = routing_map.reshape(seq_length, batch_size * num_experts).sum(dim=0)
    aggregated = per_seq_probs.sum(dim=0)
    scale = num_experts * coeff / (topk * seq_length * seq_length)
    return torch.sum(aggregated * per_seq_tokens.to(aggregated.dtype)) * scale / batch_size


def z_loss_func(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, times ``coeff``."""
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * coeff


def sinkhorn(cost: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Sinkhorn normalization of exp(cost) [T, E] towards uniform row and column sums."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), device=cost.device, dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), device=cost.device, dtype=cost.dtype)
    eps = 1e-8
    error = float("inf")
    d1_old = d1
    while error > tol:
        d0 = (1.0 / d0.size(0)) / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1.0 / d1.size(0)) / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1)).item()
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int):
    """Top-k restricted to the ``group_topk`` best of ``num_groups`` contiguous expert groups.

    A group's score is the sum of its best topk/group_topk expert scores. Returns
    (values [T, topk], indices [T, topk]).
    """
    num_tokens, num_experts = scores.shape
    group_scores = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups)
    masked = scores.masked_fill(~score_mask.reshape(num_tokens, -1).bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)


def _topk(scores, topk, num_groups, group_topk):
    if group_topk:
        return group_limited_topk(scores, topk, num_groups, group_topk)
    return torch.topk(scores, k=topk, dim=-1)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(probs [T, E] zero outside the selection, routing_map [T, E] bool).

    softmax: top-k of the logits then softmax over the k (or, with ``use_pre_softmax``,
    softmax over all experts then top-k). sigmoid: top-k of sigmoid scores (plus
    ``expert_bias`` for the selection only), normalized to sum 1 when k > 1. The probs
    are multiplied by ``scaling_factor`` when given. Math in fp32, result in logits' dtype.
    """
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            probs, top_indices = _topk(scores, topk, num_groups, group_topk)
        else:
            values, top_indices = _topk(logits, topk, num_groups, group_topk)
            probs = torch.softmax(values, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
        if expert_bias is not None:
            _, top_indices = _topk(scores + expert_bias.float(), topk, num_groups, group_topk)
            scores = torch.gather(scores, dim=1, index=top_indices)
        else:
            scores, top_indices = _topk(scores, topk, num_groups, group_topk)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"--moe-router-score-function {score_function!r}: use softmax or sigmoid")
    if scaling_factor:
        probs = probs * scaling_factor
    probs = probs.type_as(logits)
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
    return routing_probs, routing_map


def scores_for_aux_loss(logits: torch.Tensor, topk: int, score_function: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(routing_map, scores) the balancing losses use: the plain top-k of the normalized
    scores over all experts (no groups, no expert bias), in fp32."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits.float())
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    top_indices = torch.topk(scores, k=topk, dim=1)[1]
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top_indices, True)
    return routing_map, scores


def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: Optional[int] = None) -> int:
    """Slots per expert: ceil(num_tokens / num_experts * capacity_factor) (at least ``min_capacity``)."""
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


def padded_expert_rows(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Tokens every expert gets from ``apply_router_token_dropping`` with ``pad_to_capacity``:
    its capacity, or all ``num_tokens`` when the capacity is at least that."""
    return min(get_capacity(num_tokens * topk, num_experts, capacity_factor), num_tokens)


def _keep_first(routing_map: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per expert (column), the first ``capacity`` routed tokens in token order."""
    position = torch.cumsum(routing_map.int(), dim=0)
    return routing_map & (position <= capacity)


def _keep_largest(routing_probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per expert (column), the ``capacity`` tokens with the largest probs (ties: lower token)."""
    order = torch.sort(routing_probs, dim=0, descending=True, stable=True)[1][:capacity]
    return torch.zeros_like(routing_probs, dtype=torch.bool).scatter(0, order, True)


def apply_router_token_dropping(
    routing_probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    capacity_factor: float,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cap every expert at ``get_capacity(T * topk, E, capacity_factor)`` tokens.

    ``probs`` policy keeps each expert's highest-probability tokens, ``position`` its
    earliest tokens. With ``pad_to_capacity`` every expert gets exactly ``capacity``
    tokens: the kept ones plus filler tokens with probability 0 (fixed shapes). Returns
    the new (probs, routing_map).
    """
    num_tokens, num_experts = routing_probs.shape
    capacity = get_capacity(num_tokens * topk, num_experts, capacity_factor)
    if capacity >= num_tokens:
        capacity_mask = torch.ones_like(routing_map)
    elif drop_policy == "probs":
        capacity_mask = _keep_largest(routing_probs.detach().float(), capacity)
    elif drop_policy == "position":
        if pad_to_capacity:
            # Kept tokens first, then the earliest unrouted ones as filler.
            key = routing_map.float() * 2.0 + torch.linspace(1.0, 0.0, num_tokens, device=routing_map.device)[:, None]
            capacity_mask = _keep_largest(key, capacity)
        else:
            capacity_mask = _keep_first(routing_map, capacity)
    else:
        raise ValueError(f"--moe-token-drop-policy {drop_policy!r}: use probs or position")
    final_map = capacity_mask if pad_to_capacity else routing_map & capacity_mask
    return routing_probs * final_map, final_map
