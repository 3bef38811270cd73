"""Forward-backward schedules over micro-batches.

Contract (Megatron-Core's): ``forward_step_func(data_iterator, model)`` returns
``(output_tensor, loss_func)``; ``loss_func(output_tensor)`` returns either
``(loss, num_tokens, reported)`` or ``(loss, reported)``. The schedule scales the loss
for backward (by 1/num_tokens unless per-token loss is asked for, then by
1/num_microbatches) and returns the list of ``reported`` dicts, one per micro-batch.

With pipelining, only the last stage calls ``loss_func`` and returns the dicts (other
stages return ``[]``); every stage runs the order ``schedule_table.pipeline_plan`` gives
it, hands received activations to its chunk through ``set_input_tensor``, frees each
output's data once sent (``deallocate_output_tensor``, when
``config.deallocate_pipeline_outputs``) and calls ``finalize_model_grads_func`` at the end.
With ``config.overlap_p2p_comm`` (interleaved only) an exchange is not waited for where it
is posted but before the next compute step of its flow, so transfers run behind compute.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from megatron.core.pipeline_parallel.p2p_communication import P2PConfig, PendingExchange, post_exchange
from megatron.core.pipeline_parallel.schedule_table import Exchange, pipeline_plan
from megatron.core.process_groups import ProcessGroups, resolve
from megatron.core.transformer.aux_loss_scale import auxiliary_loss_scale, main_loss_scale


def get_forward_backward_func(pg_collection: Optional[ProcessGroups] = None, vp_size: Optional[int] = None) -> Callable:
    """The schedule for this layout (Megatron-Core's dispatch).

    One pipeline stage: ``forward_backward_no_pipelining``; several: 1F1B
    (``forward_backward_pipelining_without_interleaving``), or the interleaved schedule
    when ``vp_size`` (model chunks per rank; default: the size given to
    ``parallel_state.initialize_model_parallel``) is more than 1.
    """
    groups = resolve(pg_collection)
    if groups.size("pp") == 1:
        return forward_backward_no_pipelining
    if vp_size is None:
        from megatron.core import parallel_state

        vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp_size is not None and vp_size > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def _model_config(model) -> object:
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "config"):
        inner = inner.module
    return getattr(inner, "config", None)


def _wrapped_attribute(model, name: str):
    """``name`` of ``model`` or of the module it wraps (DDP, precision wrappers)."""
    inner = model
    while not hasattr(inner, name) and hasattr(inner, "module"):
        inner = inner.module
    return getattr(inner, name)


def forward_step(forward_step_func, data_iterator, model, num_microbatches, config, cp_size=1, *,
                 input_tensor: Optional[torch.Tensor] = None, is_last_stage: bool = True, cp_group=None):
    """Run one micro-batch forward; return (loss scaled for backward, num_tokens, reported).

    Pipeline stages: ``input_tensor`` (the previous stage's activation) is handed to the
    model through ``set_input_tensor`` first; a stage that is not the last returns
    ``(output activation, None, None)`` without calling the loss function.
    """
    if input_tensor is not None:
        _wrapped_attribute(model, "set_input_tensor")(input_tensor)
    per_token = bool(getattr(config, "calculate_per_token_loss", False))
    # Auxiliary losses (MoE balancing) enter the backward with the main loss's scale.
    with auxiliary_loss_scale(main_loss_scale(per_token, cp_size, num_microbatches)):
        output_tensor, loss_func = forward_step_func(data_iterator, model)
    if not is_last_stage:
        return output_tensor, None, None
    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        loss, num_tokens, reported = outputs
        if not per_token:
            loss = loss / _context_parallel_token_count(num_tokens, cp_size, cp_group)
            loss = loss * cp_size / num_microbatches
    elif len(outputs) == 2:
        loss, reported = outputs
        num_tokens = torch.zeros((), dtype=torch.int, device=loss.device)
        loss = loss * cp_size / num_microbatches
    else:
        raise ValueError(
            "loss_func must return (loss, num_tokens, reported) or (loss, reported); "
            f"it returned {len(outputs)} values"
        )
    return loss, num_tokens, reported


def _context_parallel_token_count(num_tokens: torch.Tensor, cp_size: int, cp_group) -> torch.Tensor:
    """The micro-batch's token count over all context-parallel ranks (all-reduce over ``cp_group``).

    Forward only (a count, no gradient). Each CP rank holds part of the sequence: dividing
    its loss sum by the whole sequence's count, times cp, and averaging gradients over
    dp x cp gives exactly the one-process mean, also when loss masks differ per chunk."""
    if cp_size == 1 or cp_group is None:
        return num_tokens
    total = num_tokens.detach().clone().to(torch.float32)
    torch.distributed.all_reduce(total, group=cp_group)
    return total


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
    cp_group = resolve(pg_collection).cp
    no_sync = getattr(module, "no_sync", contextlib.nullcontext)
    reported_list: List[dict] = []
    total_tokens = None  # stays on the loss's device: no host sync per micro-batch

    def one(i: int) -> None:
        nonlocal total_tokens
        loss, num_tokens, reported = forward_step(forward_step_func, iterator, module, num_microbatches, config, cp_size,
                                                 cp_group=cp_group)
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


def deallocate_output_tensor(output: Optional[torch.Tensor], deallocate: bool = True) -> None:
    """Free the storage of a stage output that has been sent on, keeping its ``grad_fn``.

    The next stage holds its own copy; backward only needs the graph, which
    ``_backward_through`` runs without checking the (now 1-element) output's shape.
    Views and graph leaves are left alone: freeing them would free someone else's data.
    """
    if not deallocate or output is None or output._base is not None or output.grad_fn is None:
        return
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def _backward_through(output: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """``torch.autograd.backward(output, grad)``, also when ``output``'s data was freed."""
    if grad is None or output.shape == grad.shape:
        torch.autograd.backward(output, grad_tensors=grad)
        return
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (grad,), False, False, (), True, True
    )


def backward_step_pipeline(input_tensor: Optional[torch.Tensor], output_tensor: torch.Tensor,
                           output_tensor_grad: Optional[torch.Tensor],
                           grad_scale_func: Optional[Callable]) -> Optional[torch.Tensor]:
    """Backward of one stage: from the loss (last stage, ``output_tensor_grad`` None; scaled
    by ``grad_scale_func`` for fp16) or from the next stage's gradient; returns the
    gradient w.r.t. ``input_tensor`` (None on the first stage)."""
    if output_tensor_grad is None and grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    _backward_through(output_tensor, output_tensor_grad)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        # The stage did not use its input (no layers and no residual path): zero gradient.
        return torch.zeros_like(input_tensor)
    return input_tensor.grad


class _GradSyncGate:
    """Keeps every chunk inside its ``no_sync()`` until that chunk's last backward, so that
    (with overlapped reduction) each chunk's grads are reduced exactly once."""

    def __init__(self, chunks: List[torch.nn.Module], enabled: bool):
        self._open: Dict[int, contextlib.AbstractContextManager] = {}
        if not enabled:
            return
        for index, chunk in enumerate(chunks):
            no_sync = getattr(chunk, "no_sync", None)
            if no_sync is not None:
                context = no_sync()
                context.__enter__()
                self._open[index] = context

    def release(self, index: int) -> None:
        context = self._open.pop(index, None)
        if context is not None:
            context.__exit__(None, None, None)

    def release_all(self) -> None:
        for index in list(self._open):
            self.release(index)


def _p2p_config(config, pg: ProcessGroups, seq_length: Optional[int], micro_batch_size: Optional[int]) -> P2PConfig:
    """Shape [s / (cp * (tp if SP)), mbs, h] and dtype of the activations stages exchange."""
    if seq_length is None or micro_batch_size is None:
        raise ValueError("pipeline schedules need seq_length and micro_batch_size (the p2p message shape)")
    seq = seq_length // pg.size("cp")
    if getattr(config, "sequence_parallel", False):
        seq //= pg.size("tp")
    dtype = getattr(config, "pipeline_dtype", None) or getattr(config, "params_dtype", torch.float32)
    if getattr(config, "fp32_residual_connection", False):
        dtype = torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return P2PConfig(pg.pp, (seq, micro_batch_size, config.hidden_size), dtype, device)


class _PlanRunner:
    """Executes one rank's ``pipeline_plan`` with real tensors (see schedule_table)."""

    def __init__(self, *, forward_step_func, data_iterators, chunks, num_microbatches, config, pg,
                 p2p: P2PConfig, forward_only, grad_scale_func, collect_non_loss_data, overlap_p2p: bool = False):
        self.forward_step_func, self.data_iterators, self.chunks = forward_step_func, data_iterators, chunks
        self.num_microbatches, self.config, self.p2p = num_microbatches, config, p2p
        self.forward_only, self.grad_scale_func = forward_only, grad_scale_func
        self.collect_non_loss_data = collect_non_loss_data
        self.cp_size, self.cp_group = pg.size("cp"), pg.cp
        self.pp_rank, self.pp_size = pg.rank("pp"), pg.size("pp")
        self.deallocate = bool(getattr(config, "deallocate_pipeline_outputs", False))
        n = len(chunks)
        self.inputs = [deque() for _ in range(n)]  # activations received, per chunk, in order
        self.grads = [deque() for _ in range(n)]  # output grads received, per chunk, in order
        self.saved: Dict[Tuple[int, int], Tuple] = {}  # (mb, chunk) -> (input, output) for backward
        self.to_send: Dict[Tuple[int, int], torch.Tensor] = {}
        self.input_grads: Dict[Tuple[int, int], torch.Tensor] = {}
        self.reported: List[dict] = []
        self.total_tokens = torch.zeros((), dtype=torch.int64, device=p2p.device)
        # overlap_p2p: exchanges posted but not yet waited for, per flow (the plan keeps the
        # flows in separate exchanges); each is waited for before the next compute step of
        # its flow, which may use what it received.
        self.overlap_p2p = overlap_p2p
        self.in_flight: Dict[str, List[PendingExchange]] = {"F": [], "B": []}

    def wait_in_flight(self, kind: str) -> None:
        """Wait for the exchanges of flow ``kind`` ('F' activations, 'B' gradients)."""
        for pending in self.in_flight[kind]:
            pending.wait()
        self.in_flight[kind].clear()

    def first_virtual(self, chunk: int) -> bool:
        return self.pp_rank == 0 and chunk == 0

    def last_virtual(self, chunk: int) -> bool:
        return self.pp_rank == self.pp_size - 1 and chunk == len(self.chunks) - 1

    def forward(self, mb: int, chunk: int) -> None:
        self.wait_in_flight("F")
        input_tensor = None if self.first_virtual(chunk) else self.inputs[chunk].popleft()
        last = self.last_virtual(chunk)
        output, tokens, reported = forward_step(
            self.forward_step_func, self.data_iterators[chunk], self.chunks[chunk], self.num_microbatches,
            self.config, self.cp_size, input_tensor=input_tensor, is_last_stage=last, cp_group=self.cp_group,
        )
        if last:
            self.total_tokens += tokens.detach().reshape(()).to(self.total_tokens.device, torch.int64)
            if not self.collect_non_loss_data:
                self.reported.append(reported)
        else:
            self.to_send[(mb, chunk)] = output
        if not self.forward_only:
            self.saved[(mb, chunk)] = (input_tensor, output)

    def backward(self, mb: int, chunk: int) -> None:
        self.wait_in_flight("B")
        output_grad = None if self.last_virtual(chunk) else self.grads[chunk].popleft()
        input_tensor, output = self.saved.pop((mb, chunk))
        input_grad = backward_step_pipeline(input_tensor, output, output_grad,
                                            self.grad_scale_func if output_grad is None else None)
        if not self.first_virtual(chunk):
            self.input_grads[(mb, chunk)] = input_grad

    def exchange(self, action: Exchange) -> None:
        send_next = self.to_send.pop(action.send_next) if action.send_next is not None else None
        send_prev = self.input_grads.pop(action.send_prev) if action.send_prev is not None else None
        from_prev, from_next, pending = post_exchange(
            self.p2p, send_next=send_next, send_prev=send_prev,
            recv_prev=action.recv_prev is not None, recv_next=action.recv_next is not None,
        )
        if self.overlap_p2p:
            self.in_flight["F" if action.activation_flow else "B"].append(pending)
        else:
            pending.wait()
        # The transfer reads its own reference to the storage: the output's can go now.
        deallocate_output_tensor(send_next, self.deallocate and not self.forward_only)
        if action.recv_prev is not None:
            self.inputs[action.recv_prev].append(from_prev)
        if action.recv_next is not None:
            self.grads[action.recv_next].append(from_next)

    def run(self, plan) -> None:
        last_backward = {a.chunk: i for i, a in enumerate(plan) if not isinstance(a, Exchange) and a.kind == "B"}
        gate = _GradSyncGate(self.chunks, enabled=not self.forward_only)
        try:
            for i, action in enumerate(plan):
                if isinstance(action, Exchange):
                    self.exchange(action)
                elif action.kind == "F":
                    self.forward(action.microbatch, action.chunk)
                else:
                    if last_backward.get(action.chunk) == i:
                        gate.release(action.chunk)
                    self.backward(action.microbatch, action.chunk)
            # Not in ``finally``: after an error the peers may never complete them.
            self.wait_in_flight("F")
            self.wait_in_flight("B")
        finally:
            gate.release_all()


def _run_pipelined(*, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
                   forward_only, collect_non_loss_data, grad_scale_func, finalize_model_grads_func,
                   pg_collection, interleaved: bool) -> List[dict]:
    chunks = model if isinstance(model, list) else [model]
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator] * len(chunks)
    if len(iterators) != len(chunks):
        raise ValueError(f"{len(chunks)} model chunks need one data iterator each, got {len(iterators)}")
    if not interleaved and len(chunks) != 1:
        raise ValueError("the 1F1B schedule takes one model chunk; use the interleaved schedule for more")
    pg = resolve(pg_collection)
    config = _model_config(chunks[0])
    group_size = getattr(config, "microbatch_group_size_per_vp_stage", None) if interleaved else None
    overlap_p2p = bool(getattr(config, "overlap_p2p_comm", False))
    if overlap_p2p and interleaved and getattr(config, "batch_p2p_comm", False):
        raise ValueError("overlap_p2p_comm and batch_p2p_comm cannot both be set (Megatron's rule): set "
                         "batch_p2p_comm=False; the overlapped exchanges are still posted as batches")
    plan = pipeline_plan(pg.size("pp"), pg.rank("pp"), num_microbatches, len(chunks) if interleaved else None,
                         group_size, forward_only, overlap_p2p)
    runner = _PlanRunner(
        forward_step_func=forward_step_func, data_iterators=iterators, chunks=chunks,
        num_microbatches=num_microbatches, config=config, pg=pg,
        p2p=_p2p_config(config, pg, seq_length, micro_batch_size), forward_only=forward_only,
        grad_scale_func=grad_scale_func, collect_non_loss_data=collect_non_loss_data, overlap_p2p=overlap_p2p,
    )
    runner.run(plan)
    if not forward_only and finalize_model_grads_func is not None:
        per_token = bool(getattr(config, "calculate_per_token_loss", False))
        finalize_model_grads_func(chunks, runner.total_tokens if per_token else None)
    return runner.reported if pg.is_pipeline_last_stage() else []


def forward_backward_pipelining_without_interleaving(
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
    """1F1B over the pipeline group: warmup forwards, one-forward-one-backward, cooldown.

    ``model`` is this stage's single chunk. Returns the ``reported`` dicts of the loss
    function (one per micro-batch) on the last stage, ``[]`` elsewhere.
    ``finalize_model_grads_func(chunks, num_tokens)`` runs at the end (not when
    ``forward_only``); ``num_tokens`` is this rank's loss-token count with per-token loss
    (zero except on the last stage), else None.
    """
    return _run_pipelined(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, grad_scale_func=grad_scale_func,
        finalize_model_grads_func=finalize_model_grads_func, pg_collection=pg_collection, interleaved=False,
    )


def forward_backward_pipelining_with_interleaving(
    *,
    forward_step_func: Callable,
    data_iterator: List[Iterator],
    model: List[torch.nn.Module],
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
    """Interleaved 1F1B: ``model`` holds this rank's VPP chunks (chunk c is virtual stage
    c * PP + rank) and ``data_iterator`` one iterator per chunk (None for chunks that read
    no data). Micro-batches go through the chunks in groups of
    ``config.microbatch_group_size_per_vp_stage`` (default PP). Returns as 1F1B does."""
    if not isinstance(model, list) or not isinstance(data_iterator, list):
        raise ValueError("the interleaved schedule takes a list of model chunks and a list of data iterators")
    return _run_pipelined(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, grad_scale_func=grad_scale_func,
        finalize_model_grads_func=finalize_model_grads_func, pg_collection=pg_collection, interleaved=True,
    )
