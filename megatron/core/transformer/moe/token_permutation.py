"""Token permutation of the MoE layer: which rows the experts get, and how their outputs
come back to the tokens, computed without host synchronization where the sizes are known.

A ``RoutePlan`` lists the (token, expert) pairs of a routing map [T, E] in expert-major
order, tokens ascending within an expert (the order ``routing_map.t().nonzero()`` gives,
which fixes the experts' inputs). Three ways to build it:

- ``exact_topk_plan``: every token has exactly ``k`` routes (dropless routing; the router
  guarantees it without a capacity factor). N = T * k rows is known on the host, so the
  plan is a sort and an argsort on the device, with no ``nonzero``/``tolist``. The plan
  also keeps ``pair_index`` (token-major pair t * k + j of each row, slot j being the
  token's j-th expert in ascending order) and its inverse, so that rows move between the
  two orders by gathers alone: ``dispatch_rows`` (forward gather, backward gather + sum
  over the k slots) and ``combine_rows`` (gather back to token-major, weight, sum over
  slots) need no index_add, whose backward/forward use atomics on the GPU.
- ``capacity_plan``: every expert has exactly ``rows_per_expert`` tokens
  (--moe-pad-expert-input-to-capacity), also known on the host.
- ``nonzero_plan``: anything else (token dropping without padding); syncs on ``nonzero``.

Rows that gather with unique indices (``gather_rows``/``scatter_rows``) likewise get an
atomic-free backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import padded_expert_rows


class _GatherRows(torch.autograd.Function):
    """Forward: ``x[index]`` for an ``index`` without repeats. Backward: the gradient
    copied back to those rows of zeros [rows, ...] (an index_copy, no atomics), or, when
    ``index`` is a permutation with ``inverse`` given, gathered with ``inverse``."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(index if inverse is None else inverse)
        ctx.rows, ctx.permutation = x.size(0), inverse is not None
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if ctx.permutation:
            return grad.index_select(0, index), None, None
        return grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:])).index_copy_(0, index, grad), None, None


class _ScatterRows(torch.autograd.Function):
    """Forward: zeros [rows, ...] with row ``index[i]`` = ``x[i]`` (``index`` without
    repeats). Backward: ``grad[index]`` (a gather)."""

    @staticmethod
    def forward(ctx, x, index, rows):
        ctx.save_for_backward(index)
        return x.new_zeros((rows,) + tuple(x.shape[1:])).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[index]`` for an index without repeats; its backward copies rather than adds
    (a gather with ``inverse`` when ``index`` is a permutation of x's rows)."""
    return _GatherRows.apply(x, index, inverse)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """A [rows, ...] zero tensor holding ``x[i]`` at row ``index[i]`` (no repeats in ``index``)."""
    return _ScatterRows.apply(x, index, rows)


class _ExpandRows(torch.autograd.Function):
    """Forward: tokens [T, h] -> rows [N, h], row i = ``tokens[pair_index[i] // k]``
    (every token copied to its k rows). Backward: the gradient gathered back to
    token-major pair order with ``inverse`` and summed over each token's k slots in slot
    order (what an index_add over the rows would add, without atomics)."""

    @staticmethod
    def forward(ctx, tokens, token_index, inverse, topk):
        ctx.save_for_backward(inverse)
        ctx.topk = topk
        return tokens.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse)
        return per_slot.view(-1, ctx.topk, grad.size(-1)).sum(dim=1), None, None, None


@dataclass
class RoutePlan:
    """The routed (token, expert) pairs in expert-major order (tokens ascending).

    ``token_index`` [N], ``expert_index`` [N]: source token and (map column) expert of
    each row; ``counts`` [E] (int64, device): rows per expert; ``num_rows`` N (host).
    Exact-k plans also carry ``topk``, ``pair_index`` [N] (token-major pair t * k + j of
    each row), ``inverse`` [N] (row of each token-major pair) and ``slot_experts`` [T, k]
    (each token's experts, ascending).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    counts: torch.Tensor
    num_rows: int
    topk: Optional[int] = None
    pair_index: Optional[torch.Tensor] = None
    inverse: Optional[torch.Tensor] = None
    slot_experts: Optional[torch.Tensor] = None

    @property
    def exact_topk(self) -> bool:
        return self.pair_index is not None

    def reordered(self, order: torch.Tensor) -> "RoutePlan":
        """Row i taken from row ``order[i]``. For an exact-k plan ``order`` must be a
        permutation of the rows; other plans may repeat rows (a pair sent twice)."""
        pair_index = None if self.pair_index is None else self.pair_index.index_select(0, order)
        return RoutePlan(
            self.token_index.index_select(0, order), self.expert_index.index_select(0, order), self.counts,
            order.numel(), self.topk, pair_index, None if pair_index is None else _inverse(pair_index),
            self.slot_experts,
        )


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(permutation.numel(), device=permutation.device)
    return torch.empty_like(permutation).scatter_(0, permutation, positions)


def nonzero_plan(routing_map: torch.Tensor) -> RoutePlan:
    """Any routing map; waits for the device (``nonzero`` has a data-dependent size)."""
    expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
    return RoutePlan(token_index, expert_index, routing_map.sum(dim=0), token_index.numel())


def exact_topk_plan(routing_map: torch.Tensor, topk: int) -> RoutePlan:
    """A map with exactly ``topk`` True per row (not checked: that would sync)."""
    num_tokens = routing_map.size(0)
    # A stable descending sort of the 0/1 rows puts each token's experts first, ascending.
    slot_experts = torch.sort(routing_map.to(torch.int8), dim=1, descending=True, stable=True)[1][:, :topk]
    flat_experts = slot_experts.reshape(-1)
    # Stable: tokens stay ascending within an expert, as in routing_map.t().nonzero().
    pair_index = torch.argsort(flat_experts, stable=True)
    return RoutePlan(
        token_index=torch.div(pair_index, topk, rounding_mode="floor"),
        expert_index=flat_experts.index_select(0, pair_index),
        counts=routing_map.sum(dim=0),
        num_rows=num_tokens * topk,
        topk=topk,
        pair_index=pair_index,
        inverse=_inverse(pair_index),
        slot_experts=slot_experts,
    )


def capacity_plan(routing_map: torch.Tensor, rows_per_expert: int) -> RoutePlan:
    """A map with exactly ``rows_per_expert`` True per column (not checked: that would sync)."""
    num_experts = routing_map.size(1)
    by_expert = torch.sort(routing_map.t().to(torch.int8), dim=1, descending=True, stable=True)[1]
    device = routing_map.device
    counts = torch.full((num_experts,), rows_per_expert, dtype=torch.long, device=device)
    expert_index = torch.arange(num_experts, device=device).repeat_interleave(rows_per_expert)
    token_index = by_expert[:, :rows_per_expert].reshape(-1)
    return RoutePlan(token_index, expert_index, counts, num_experts * rows_per_expert)


def dispatch_rows(tokens: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """tokens [T, h] -> the plan's rows [N, h] (row i = tokens[plan.token_index[i]])."""
    if plan.exact_topk:
        return _ExpandRows.apply(tokens, plan.token_index, plan.inverse, plan.topk)
    return tokens.index_select(0, plan.token_index)


def row_probs(probs: torch.Tensor, plan: RoutePlan, first_expert: int = 0) -> torch.Tensor:
    """The routing prob of each pair: [T, k] by slot for exact-k plans, else [N] by row.
    ``first_expert``: the global id of the plan's expert 0 (``probs`` has every expert)."""
    if plan.exact_topk:
        return probs.gather(1, plan.slot_experts + first_expert)
    return probs[plan.token_index, plan.expert_index + first_expert]


def combine_rows(expert_output: torch.Tensor, weights: torch.Tensor, plan: RoutePlan, num_tokens: int) -> torch.Tensor:
    """Sum over each token's rows of weight * output: [N, h] -> [num_tokens, h], with
    ``weights`` from ``row_probs``. Products and sums in the output's dtype (the weights
    are cast to it); exact-k plans add a token's k terms in slot (ascending expert) order."""
    hidden = expert_output.size(-1)
    weights = weights.to(expert_output.dtype)
    if plan.exact_topk:
        per_slot = gather_rows(expert_output, plan.inverse, plan.pair_index).view(num_tokens, plan.topk, hidden)
        return (per_slot * weights.unsqueeze(-1)).sum(dim=1)
    weighted = expert_output * weights.unsqueeze(-1)
    return expert_output.new_zeros((num_tokens, hidden)).index_add(0, plan.token_index, weighted)


@dataclass(frozen=True)
class RoutingLayout:
    """What the router guarantees about every routing map [T, E] it returns, from the
    config: exactly ``topk`` routes per token without a capacity factor; exactly
    ``padded_expert_rows`` tokens per expert with --moe-pad-expert-input-to-capacity;
    nothing host-known when tokens are dropped without padding."""

    topk: int
    capacity_factor: Optional[float] = None
    pad_to_capacity: bool = False

    @classmethod
    def from_config(cls, config, whole_maps: bool = True) -> "RoutingLayout":
        """``whole_maps``: the dispatcher gets the router's maps whole, not a slice of
        their rows (a slice keeps k routes per token but not the padded expert counts)."""
        pad = config.moe_pad_expert_input_to_capacity and whole_maps
        return cls(config.moe_router_topk, config.moe_expert_capacity_factor, pad)

    def plan(self, routing_map: torch.Tensor) -> RoutePlan:
        """The plan of a map the router returned (the full map, all experts, this rank's tokens)."""
        if self.capacity_factor is None:
            return exact_topk_plan(routing_map, self.topk)
        if self.pad_to_capacity:
            num_tokens, num_experts = routing_map.shape
            rows = padded_expert_rows(num_tokens, num_experts, self.topk, self.capacity_factor)
            return capacity_plan(routing_map, rows)
        return nonzero_plan(routing_map)
