"""Forward-backward schedules over micro-batches.

Contract (Megatron-Core's): ``forward_step_func(data_iterator, model)`` returns
``(output_tensor, loss_func)``; ``loss_func(output_tensor)`` returns either
``(loss, num_tokens, reported)`` or ``(loss, reported)``. The schedule scales the loss
for backward (by 1/num_tokens unless per-token loss is asked for, then by
1/num_microbatches) and returns the list of ``reported`` dicts, one per micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Union

import torch

from megatron.core.process_groups import ProcessGroups, resolve


def get_forward_backward_func(pg_collection: Optional[ProcessGroups] = None) -> Callable:
    """The schedule for this layout: without pipelining when the pipeline has one stage."""
    groups = resolve(pg_collection)
    if groups.size("pp") > 1:
        raise NotImplementedError(
            "--pipeline-model-parallel-size > 1 is not available in this build yet; use 1"
        )
    return forward_backward_no_pipelining


def _model_config(model) -> object:
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "config"):
        inner = inner.module
    return getattr(inner, "config", None)


def forward_step(forward_step_func, data_iterator, model, num_microbatches, config, cp_size=1):
    """Run one micro-batch forward; return (loss scaled for backward, num_tokens, reported)."""
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    outputs = loss_func(output_tensor)
    per_token = bool(getattr(config, "calculate_per_token_loss", False))
    if len(outputs) == 3:
        loss, num_tokens, reported = outputs
        if not per_token:
            loss = loss / num_tokens
            loss = loss * cp_size / num_microbatches
    elif len(outputs) == 2:
        loss, reported = outputs
        num_tokens = torch.tensor(0, dtype=torch.int)
        loss = loss * cp_size / num_microbatches
    else:
        raise ValueError(
            "loss_func must return (loss, num_tokens, reported) or (loss, reported); "
            f"it returned {len(outputs)} values"
        )
    return loss, num_tokens, reported


def backward_step(loss: torch.Tensor, grad_scale_func: Optional[Callable]) -> None:
    """Backward from the (possibly loss-scaled, for fp16) micro-batch loss."""
    if grad_scale_func is not None:
        loss = grad_scale_func(loss)
    loss.backward()


def forward_backward_no_pipelining(
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: Union[torch.nn.Module, List[torch.nn.Module]],
    num_microbatches: int,
    seq_length: int = None,
    micro_batch_size: int = None,
    decoder_seq_length: int = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool = None,
    grad_scale_func: Optional[Callable] = None,
    finalize_model_grads_func: Optional[Callable] = None,
    pg_collection: Optional[ProcessGroups] = None,
) -> List[dict]:
    """All micro-batches forward and backward on one stage.

    Micro-batches 0..M-2 run under the model's ``no_sync()`` so that gradients only
    accumulate; the last one runs outside it and so ends the data-parallel reduction,
    which ``finalize_model_grads_func(model_list, num_tokens)`` completes.
    """
    models = model if isinstance(model, list) else [model]
    if len(models) != 1:
        raise ValueError("forward_backward_no_pipelining takes one model chunk; use a pipeline schedule for more")
    module = models[0]
    iterator = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
    config = _model_config(module)
    cp_size = resolve(pg_collection).size("cp")
    no_sync = getattr(module, "no_sync", contextlib.nullcontext)
    reported_list: List[dict] = []
    total_tokens = None  # stays on the loss's device: no host sync per micro-batch

    def one(i: int) -> None:
        nonlocal total_tokens
        loss, num_tokens, reported = forward_step(forward_step_func, iterator, module, num_microbatches, config, cp_size)
        tokens = num_tokens.detach().reshape(()).to(torch.int64)
        total_tokens = tokens if total_tokens is None else total_tokens + tokens
        if not forward_only:
            backward_step(loss, grad_scale_func)
        if not collect_non_loss_data:
            reported_list.append(reported)

    context = contextlib.nullcontext() if forward_only else no_sync()
    with context:
        for i in range(num_microbatches - 1):
            one(i)
    one(num_microbatches - 1)
    if not forward_only and finalize_model_grads_func is not None:
        per_token = bool(getattr(config, "calculate_per_token_loss", False))
        finalize_model_grads_func(models, total_tokens if per_token else None)
    return reported_list
