"""Token dispatchers: move each token to the ranks that hold its experts and back.

Both dispatchers work over the expert tensor x expert parallel group (``tp_ep``): every
rank of it holds distinct tokens (the MoE layer splits replicated tensor-parallel
activations first), and expert e lives on the ``expt_tp`` ranks of expert-parallel rank
e // (E / EP), each with a shard of its weights. A rank's experts compute partial
outputs for every token sent to them; ``combine`` weights them by the routing probs and
sums all contributions of a token (other experts, other shards) on the token's own rank.

``dispatch(tokens [T, h], probs [T, E], routing_map [T, E] bool)`` ->
(expert_input [N, h] grouped by local expert, tokens_per_expert [E_local] list of int,
state); ``combine(expert_output [N, h], state)`` -> [T, h].

- ``allgather``: all-gather tokens, probs and map over tp_ep; each rank picks the tokens of
  its experts; the weighted outputs are reduce-scattered back.
- ``alltoall``: each rank sends every (token, expert) pair only to the ranks holding that
  expert (all-to-all with uneven splits; token counts exchanged first), and gets the
  partial outputs back by the reverse all-to-all.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.collectives import all_gather_first_dim, comm_device
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
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
    out = tensor.new_empty((sum(output_splits),) + tuple(tensor.shape[1:]))
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


def _combine_weighted(expert_output, token_index, probs, num_tokens: int) -> torch.Tensor:
    """Sum of prob * output per token: [N, h] rows of tokens ``token_index`` -> [num_tokens, h]."""
    weighted = expert_output * probs.unsqueeze(-1).to(expert_output.dtype)
    out = expert_output.new_zeros((num_tokens, expert_output.size(-1)))
    return out.index_add(0, token_index, weighted)


class MoEAllGatherTokenDispatcher:
    """All-gather dispatch over ``tp_ep_group``; this rank's experts are
    ``local_expert_indices`` (contiguous global ids)."""

    def __init__(self, num_experts: int, local_expert_indices: Sequence[int], tp_ep_group):
        self.num_experts = num_experts
        self.first, self.last = local_expert_indices[0], local_expert_indices[-1] + 1
        self.group = tp_ep_group

    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        all_tokens = gather_from_sequence_parallel_region(tokens, self.group)
        all_probs = gather_from_sequence_parallel_region(probs, self.group)
        local_map = all_gather_routing_map(routing_map, self.group)[:, self.first:self.last]
        local_expert, token_index = local_map.t().nonzero(as_tuple=True)
        tokens_per_expert = local_map.sum(dim=0).tolist()
        expert_probs = all_probs[token_index, local_expert + self.first]
        state = (token_index, expert_probs, all_tokens.size(0))
        return all_tokens.index_select(0, token_index), tokens_per_expert, state

    def combine(self, expert_output: torch.Tensor, state) -> torch.Tensor:
        token_index, expert_probs, num_tokens = state
        out = _combine_weighted(expert_output, token_index, expert_probs, num_tokens)
        return reduce_scatter_to_sequence_parallel_region(out, self.group)


class MoEAlltoAllTokenDispatcher:
    """All-to-all dispatch over ``tp_ep_group``. ``ep_rank``/``ep_size``: this rank's
    expert-parallel coordinates; every member's ep rank is looked up once here."""

    def __init__(self, num_experts: int, local_expert_indices: Sequence[int], tp_ep_group, ep_rank: int, ep_size: int):
        self.num_experts = num_experts
        self.num_local = len(local_expert_indices)
        self.first = local_expert_indices[0]
        self.group = tp_ep_group
        self.ep_size = ep_size
        self.member_ep = group_members_ep_ranks(ep_rank, tp_ep_group)

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

    def dispatch(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
        counts = routing_map.sum(dim=0)
        order, input_splits = self._send_order(counts)
        send_tokens, send_experts = token_index[order], expert_index[order]
        # recv[j, l]: tokens member j sends to local expert l.
        recv = all_gather_counts(counts, self.group)[:, self.first:self.first + self.num_local]
        output_splits = recv.sum(dim=1).tolist()
        received = all_to_all(tokens.index_select(0, send_tokens), output_splits, input_splits, self.group)
        # Received rows are grouped by source, then expert: regroup by expert, then source.
        source_major = torch.arange(received.size(0), device=received.device).split(recv.flatten().tolist())
        grid = len(self.member_ep)
        expert_major = [source_major[j * self.num_local + l] for l in range(self.num_local) for j in range(grid)]
        regroup = torch.cat(expert_major) if expert_major else torch.zeros(0, dtype=torch.long)
        weights = probs[send_tokens, send_experts]
        state = (regroup, send_tokens, weights, output_splits, input_splits, tokens.size(0))
        return received.index_select(0, regroup), recv.sum(dim=0).tolist(), state

    def combine(self, expert_output: torch.Tensor, state) -> torch.Tensor:
        regroup, send_tokens, weights, output_splits, input_splits, num_tokens = state
        source_major = torch.empty_like(regroup)
        source_major[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        returned = all_to_all(expert_output.index_select(0, source_major), input_splits, output_splits, self.group)
        return _combine_weighted(returned, send_tokens, weights, num_tokens)


def build_token_dispatcher(config, local_expert_indices: Sequence[int], pg_collection):
    """The dispatcher --moe-token-dispatcher-type asks for."""
    tp_ep = pg_collection.tp_ep
    if config.moe_token_dispatcher_type == "alltoall":
        return MoEAlltoAllTokenDispatcher(
            config.num_moe_experts, local_expert_indices, tp_ep, group_rank(pg_collection.ep), group_size(pg_collection.ep)
        )
    return MoEAllGatherTokenDispatcher(config.num_moe_experts, local_expert_indices, tp_ep)
