"""Token dispatchers: move each token to the ranks that hold its experts and back.

Both dispatchers work over the expert tensor x expert parallel group (``tp_ep``): every
rank of it holds distinct tokens (the MoE layer splits replicated tensor-parallel
activations first), and expert e lives on the ``expt_tp`` ranks of expert-parallel rank
e // (E / EP), each with a shard of its weights. A rank's experts compute partial
outputs for every token sent to them; ``combine`` weights them by the routing probs and
sums all contributions of a token (other experts, other shards) on the token's own rank.

``dispatch(tokens [T, h], probs [T, E], routing_map [T, E] bool)`` ->
(expert_input [N, h] grouped by local expert, tokens_per_expert [E_local] (an int64
device tensor, or a list of ints where the exchange needed them on the host), state);
``combine(expert_output [N, h], state)`` -> [T, h].

With a one-rank group (one GPU) neither dispatcher waits for the device when the router's
maps have a host-known shape (``token_permutation.RoutingLayout``: dropless routing, or
padding to capacity); the all-to-all needs host-side split sizes on more ranks.

- ``allgather``: all-gather tokens, probs and map over tp_ep; each rank picks the tokens of
  its experts; the weighted outputs are reduce-scattered back.
- ``alltoall``: each rank sends every (token, expert) pair only to the ranks holding that
  expert (all-to-all with uneven splits; token counts exchanged first), and gets the
  partial outputs back by the reverse all-to-all.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core.fake_backend import receive_buffer
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim, comm_device
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.token_permutation import (
    RoutingLayout,
    combine_rows,
    dispatch_rows,
    gather_rows,
    nonzero_plan,
    row_probs,
)


def all_gather_routing_map(routing_map: torch.Tensor, group) -> torch.Tensor:
    """Forward: concatenate every rank's bool map [T, E] along dim 0 -> [W*T, E].
    Backward: not differentiable (a selection)."""
    if group_size(group) == 1:
        return routing_map
    return all_gather_first_dim(routing_map.to(torch.int32), group).bool()


def all_gather_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Forward: every rank's count vector [E] stacked in group order -> [W, E].
    Backward: not differentiable (counts)."""
    if group_size(group) == 1:
        return counts.unsqueeze(0)
    return all_gather_first_dim(counts.unsqueeze(0).contiguous(), group)


def _exchange(tensor: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    out = receive_buffer((sum(output_splits),) + tuple(tensor.shape[1:]), tensor.dtype, tensor.device, group)
    dist.all_to_all_single(out, tensor.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all of dim-0 blocks (block i of ``input_splits`` rows goes to rank
    i; block j of the output, ``output_splits[j]`` rows, comes from rank j). Backward: the
    reverse all-to-all of the gradient (splits swapped)."""

    @staticmethod
    def forward(ctx, tensor, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _exchange(tensor, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(tensor: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    """Differentiable all-to-all over ``group`` (see ``_AllToAll``); identity for one rank."""
    if group_size(group) == 1:
        return tensor
    return _AllToAll.apply(tensor, list(output_splits), list(input_splits), group)


def group_members_ep_ranks(ep_rank: int, group) -> List[int]:
    """Forward: the expert-parallel rank of each member of ``group``, in group order
    (an all-gather of ``ep_rank``). Backward: not differentiable. Called once, at construction."""
    if group_size(group) == 1:
        return [ep_rank]
    mine = torch.tensor([ep_rank], dtype=torch.int64, device=comm_device(group))
    return [int(v) for v in all_gather_first_dim(mine, group).tolist()]


class MoEAllGatherTokenDispatcher:
    """All-gather dispatch over ``tp_ep_group``; this rank's experts are
    ``local_expert_indices`` (contiguous global ids). ``layout``: what the router
    guarantees about its maps; with a one-rank group it lets the dispatch run without
    host synchronization (``token_permutation``)."""

    def __init__(self, num_experts: int, local_expert_indices: Sequence[int], tp_ep_group,
                 layout: Optional[RoutingLayout] = None):
        self.num_experts = num_experts
        self.first, self.last = local_expert_indices[0], local_expert_indices[-1] + 1
        self.group = tp_ep_group
        self.layout = layout if group_size(tp_ep_group) == 1 else None

    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        all_tokens = gather_from_sequence_parallel_region(tokens, self.group)
        all_probs = gather_from_sequence_parallel_region(probs, self.group)
        local_map = all_gather_routing_map(routing_map, self.group)[:, self.first:self.last]
        plan = nonzero_plan(local_map) if self.layout is None else self.layout.plan(local_map)
        weights = row_probs(all_probs, plan, self.first)
        state = (plan, weights, all_tokens.size(0))
        return dispatch_rows(all_tokens, plan), plan.counts, state

    def combine(self, expert_output: torch.Tensor, state) -> torch.Tensor:
        plan, weights, num_tokens = state
        out = combine_rows(expert_output, weights, plan, num_tokens)
        return reduce_scatter_to_sequence_parallel_region(out, self.group)


class MoEAlltoAllTokenDispatcher:
    """All-to-all dispatch over ``tp_ep_group``. ``ep_rank``/``ep_size``: this rank's
    expert-parallel coordinates; every member's ep rank is looked up once here.
    ``layout``: what the router guarantees about its maps; with a one-rank group the
    dispatch runs without host synchronization, and with exactly k routes per token the
    rows move by gathers on any group (``token_permutation``)."""

    def __init__(self, num_experts: int, local_expert_indices: Sequence[int], tp_ep_group, ep_rank: int, ep_size: int,
                 layout: Optional[RoutingLayout] = None):
        self.num_experts = num_experts
        self.num_local = len(local_expert_indices)
        self.first = local_expert_indices[0]
        self.group = tp_ep_group
        self.ep_size = ep_size
        self.member_ep = group_members_ep_ranks(ep_rank, tp_ep_group)
        self.layout = layout

    def _send_order(self, counts: torch.Tensor):
        """Row order of the send buffer and its splits: for each member j, the entries
        (sorted by expert, then token) of the experts held by member j's ep rank."""
        per_ep = counts.view(self.ep_size, self.num_local).sum(dim=1).tolist()
        starts = [0]
        for n in per_ep[:-1]:
            starts.append(starts[-1] + n)
        blocks = [torch.arange(starts[e], starts[e] + per_ep[e]) for e in self.member_ep]
        order = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)
        return order.to(counts.device), [per_ep[e] for e in self.member_ep]

    def _plan(self, routing_map: torch.Tensor):
        """The gather-based exact-k plan when every pair is sent exactly once (no expert
        tensor parallelism, which sends a pair to each shard of its expert)."""
        sent_once = len(set(self.member_ep)) == len(self.member_ep)
        exact_k = self.layout is not None and self.layout.capacity_factor is None and sent_once
        return self.layout.plan(routing_map) if exact_k else nonzero_plan(routing_map)

    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        if group_size(self.group) == 1 and self.layout is not None:
            plan = self.layout.plan(routing_map)
            state = (plan, row_probs(probs, plan), None, None, None, tokens.size(0))
            return dispatch_rows(tokens, plan), plan.counts, state
        plan = self._plan(routing_map)
        order, input_splits = self._send_order(plan.counts)
        send = plan.reordered(order)
        # recv[j, l]: tokens member j sends to local expert l.
        recv = all_gather_counts(plan.counts, self.group)[:, self.first:self.first + self.num_local]
        output_splits = recv.sum(dim=1).tolist()
        received = all_to_all(dispatch_rows(tokens, send), output_splits, input_splits, self.group)
        # Received rows are grouped by source, then expert: regroup by expert, then source.
        source_major = torch.arange(received.size(0), device=received.device).split(recv.flatten().tolist())
        grid = len(self.member_ep)
        expert_major = [source_major[j * self.num_local + l] for l in range(self.num_local) for j in range(grid)]
        regroup = torch.cat(expert_major) if expert_major else torch.zeros(0, dtype=torch.long)
        regroup = regroup.to(received.device)
        source_major = torch.empty_like(regroup)
        source_major[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        state = (send, row_probs(probs, send), (regroup, source_major), output_splits, input_splits, tokens.size(0))
        # Both orders are permutations: moving rows between them is a gather either way.
        return gather_rows(received, regroup, source_major), recv.sum(dim=0).tolist(), state

    def combine(self, expert_output: torch.Tensor, state) -> torch.Tensor:
        send, weights, orders, output_splits, input_splits, num_tokens = state
        if orders is None:
            return combine_rows(expert_output, weights, send, num_tokens)
        regroup, source_major = orders
        returned = all_to_all(gather_rows(expert_output, source_major, regroup), input_splits, output_splits, self.group)
        return combine_rows(returned, weights, send, num_tokens)


def build_token_dispatcher(config, local_expert_indices: Sequence[int], pg_collection):
    """The dispatcher --moe-token-dispatcher-type asks for."""
    tp_ep = pg_collection.tp_ep
    # Without sequence parallelism the MoE layer hands each tensor-parallel rank a slice
    # of the router's map, whose per-expert counts are not the padded capacity.
    sliced = group_size(pg_collection.tp) > 1 and not config.sequence_parallel
    layout = RoutingLayout.from_config(config, whole_maps=not sliced)
    if config.moe_token_dispatcher_type == "alltoall":
        return MoEAlltoAllTokenDispatcher(
            config.num_moe_experts, local_expert_indices, tp_ep, group_rank(pg_collection.ep),
            group_size(pg_collection.ep), layout=layout,
        )
    return MoEAllGatherTokenDispatcher(config.num_moe_experts, local_expert_indices, tp_ep, layout=layout)
