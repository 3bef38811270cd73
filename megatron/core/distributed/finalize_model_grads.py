"""``finalize_model_grads``: every gradient reduction due after the last backward.

Order: data-parallel sync of each chunk (``finish_grad_sync``); tensor-parallel sum of
grads of params replicated across tp ranks but fed sequence-sharded inputs
(``sequence_parallel=True``); sum of tied-embedding grads between the first and last
pipeline stage (``shared_embedding=True``); the aux-loss-free expert-bias update of MoE
routers (--moe-router-enable-expert-bias); and, for per-token loss, division by the
global token count.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import process_groups
from megatron.core.process_groups import ProcessGroups, group_size
from megatron.core.transformer.moe.expert_bias import update_router_expert_bias


def _grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The accumulated grad: ``main_grad`` under DDP, else ``.grad`` (under FSDP2 this
    rank's shard of it, the same index range on every tp rank)."""
    if hasattr(param, "main_grad"):
        return param.main_grad
    grad = param.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def all_reduce_coalesced_grads(grads: List[torch.Tensor], group) -> None:
    """Forward: sum each tensor of ``grads`` in place over ``group``, in one collective
    per dtype (flatten, all-reduce, copy back). Backward: not differentiable. No-op
    for a 1-rank group or an empty list."""
    if not grads or group_size(group) == 1:
        return
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(synced)


def broadcast_from_last_pipeline_stage(tensor: torch.Tensor, pp_group) -> None:
    """Forward: overwrite ``tensor`` with the last pipeline stage's value (only the last
    stage computes the loss and its token count). Backward: not differentiable."""
    size = group_size(pp_group)
    if size == 1:
        return
    dist.broadcast(tensor, src=dist.get_global_rank(pp_group, size - 1), group=pp_group)


def all_reduce_num_tokens(num_tokens: torch.Tensor, dp_cp_group) -> None:
    """Forward: sum the per-rank loss-token count in place over data x context parallel
    ranks. Backward: not differentiable. No-op for a 1-rank group."""
    if group_size(dp_cp_group) > 1:
        dist.all_reduce(num_tokens, group=dp_cp_group)


def _params(model_chunks, attribute: str) -> List[torch.nn.Parameter]:
    out = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and getattr(param, attribute, False):
                out.append(param)
    return out


def _allreduce_sequence_parallel_grads(model_chunks, tp_group) -> None:
    """Sum over tp the grads of params marked ``sequence_parallel`` (norm weights,
    row-parallel biases): each tp rank saw only its slice of the sequence."""
    if group_size(tp_group) == 1:
        return
    grads = [g for g in (_grad_of(p) for p in _params(model_chunks, "sequence_parallel")) if g is not None]
    all_reduce_coalesced_grads(grads, tp_group)


def _allreduce_embedding_grads(model_chunks, pp_group, embd_group) -> None:
    """Sum the tied word-embedding grads between the first and last pipeline stage."""
    if group_size(pp_group) == 1 or embd_group is None:
        return
    grads = [g for g in (_grad_of(p) for p in _params(model_chunks, "shared_embedding")) if g is not None]
    all_reduce_coalesced_grads(grads, embd_group)


def _scale_chunk_grads(chunk: torch.nn.Module, scale: torch.Tensor) -> None:
    if hasattr(chunk, "scale_gradients"):
        chunk.scale_gradients(scale)
        return
    for param in chunk.parameters():
        if param.grad is not None:
            param.grad.mul_(scale)


def finalize_model_grads(
    model_chunks: List[torch.nn.Module],
    num_tokens: Optional[torch.Tensor] = None,
    pg_collection: Optional[ProcessGroups] = None,
) -> None:
    """Finish every reduction of the step's grads, in Megatron's order.

    ``model_chunks``: the DDP-wrapped chunks of this rank. ``num_tokens``: with
    per-token loss, this rank's count of loss tokens (a tensor; the last pipeline
    stage's value is used); it is summed over dp x cp and every grad divided by it.
    """
    pgs = process_groups.resolve(pg_collection)
    for chunk in model_chunks:
        # A chunk without DDP (single process, no buffer) has nothing to reduce.
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()
    _allreduce_sequence_parallel_grads(model_chunks, pgs.tp)
    update_router_expert_bias(model_chunks, pgs.dp_cp)
    _allreduce_embedding_grads(model_chunks, pgs.pp, pgs.embd)
    if num_tokens is not None:
        broadcast_from_last_pipeline_stage(num_tokens, pgs.pp)
        all_reduce_num_tokens(num_tokens, pgs.dp_cp)
        # Clamp so that a step without loss tokens leaves grads at zero, not NaN.
        scale = 1.0 / torch.clamp(num_tokens.float(), min=1.0)
        for chunk in model_chunks:
            _scale_chunk_grads(chunk, scale)
