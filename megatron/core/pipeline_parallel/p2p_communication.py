"""Point-to-point messages between neighbouring pipeline stages.

Stages form a ring over the pipeline group: rank r's next stage is (r + 1) % PP and its
previous stage is (r - 1) % PP (the interleaved schedule sends the last rank's output of
chunk c to the first rank's chunk c + 1). Every message is one tensor of the agreed
shape ``[s / (cp * (tp if SP)), micro_batch_size, hidden]`` and dtype.

All sends and receives of one exchange go out together through
``torch.distributed.batch_isend_irecv`` (works on gloo and nccl; ``post_exchange`` returns
before they complete, for the overlapped interleaved schedule), activation flow first
(send to next, receive from previous) and gradient flow second (send to previous, receive
from next), on every rank, so that two stages that are each other's previous and next
match messages in the same order. None of these functions is differentiable: the
schedule connects the autograd graphs of neighbouring stages itself (received activations
become leaves with ``requires_grad``; their ``.grad`` is what goes back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core.fake_backend import receive_buffer
from megatron.core.process_groups import group_rank, group_size


@dataclass(frozen=True)
class P2PConfig:
    """What every message of one schedule run looks like, and where it goes."""

    pp_group: object
    tensor_shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _peer(pp_group, offset: int) -> int:
    """Global rank of the stage ``offset`` places away on the pipeline ring."""
    size = group_size(pp_group)
    return dist.get_global_rank(pp_group, (group_rank(pp_group) + offset) % size)


def _empty(cfg: P2PConfig, requires_grad: bool) -> torch.Tensor:
    return receive_buffer(cfg.tensor_shape, cfg.dtype, cfg.device, cfg.pp_group, requires_grad=requires_grad)


def _check_outgoing(tensor: torch.Tensor, cfg: P2PConfig, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(cfg.tensor_shape) or tensor.dtype != cfg.dtype:
        raise RuntimeError(
            f"pipeline {what} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, but stages "
            f"exchange {tuple(cfg.tensor_shape)} {cfg.dtype} ([s/(cp*(tp if SP)), mbs, h]); a stage's "
            "output must keep that shape (check --seq-length, --micro-batch-size, --sequence-parallel)"
        )
    return tensor.detach().contiguous()


class PendingExchange:
    """The requests of one posted exchange. ``wait()`` before using what it received; it
    also holds the sent tensors until then (NCCL reads them on its own stream).

    On NCCL, waiting only makes the current CUDA stream wait for the transfers (the host
    goes on); on gloo it blocks until they are done."""

    def __init__(self, requests: Sequence[object] = (), buffers: Sequence[torch.Tensor] = ()):
        self._requests = list(requests)
        self._buffers = list(buffers)  # the posted tensors, alive until the transfers are done

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests, self._buffers = [], []


def post_exchange(
    cfg: P2PConfig,
    send_next: Optional[torch.Tensor] = None,
    send_prev: Optional[torch.Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], PendingExchange]:
    """Post one batched exchange without waiting; returns ``(from_prev, from_next, pending)``.
    The received tensors hold their data only after ``pending.wait()``. Arguments and
    results as in ``exchange_with_neighbours``."""
    ops: List[dist.P2POp] = []
    from_prev = from_next = None
    group = cfg.pp_group
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, _check_outgoing(send_next, cfg, "activation"), _peer(group, 1), group))
    if recv_prev:
        from_prev = _empty(cfg, requires_grad=True)
        ops.append(dist.P2POp(dist.irecv, from_prev, _peer(group, -1), group))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _check_outgoing(send_prev, cfg, "gradient"), _peer(group, -1), group))
    if recv_next:
        from_next = _empty(cfg, requires_grad=False)
        ops.append(dist.P2POp(dist.irecv, from_next, _peer(group, 1), group))
    return from_prev, from_next, PendingExchange(dist.batch_isend_irecv(ops) if ops else (), [op.tensor for op in ops])


def exchange_with_neighbours(
    cfg: P2PConfig,
    send_next: Optional[torch.Tensor] = None,
    send_prev: Optional[torch.Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One batched exchange, waited for; returns ``(from_prev, from_next)``.

    Forward direction of the pipeline: ``send_next`` (this stage's output activation) goes
    to the next stage; ``from_prev`` is the previous stage's activation, returned as a leaf
    with ``requires_grad=True`` so that backward fills its ``.grad``. Backward direction:
    ``send_prev`` (the gradient w.r.t. this stage's input) goes to the previous stage;
    ``from_next`` is the gradient w.r.t. this stage's output. Not differentiable itself.
    """
    from_prev, from_next, pending = post_exchange(cfg, send_next, send_prev, recv_prev, recv_next)
    pending.wait()
    return from_prev, from_next


def recv_forward(cfg: P2PConfig) -> torch.Tensor:
    """Forward: receive the previous stage's activation (a leaf that requires grad).
    Backward: nothing (its ``.grad`` is sent back by ``send_backward``)."""
    return exchange_with_neighbours(cfg, recv_prev=True)[0]


def send_forward(output_tensor: torch.Tensor, cfg: P2PConfig) -> None:
    """Forward: send this stage's activation to the next stage. Backward: nothing."""
    exchange_with_neighbours(cfg, send_next=output_tensor)


def recv_backward(cfg: P2PConfig) -> torch.Tensor:
    """Receive the gradient w.r.t. this stage's output from the next stage."""
    return exchange_with_neighbours(cfg, recv_next=True)[1]


def send_backward(input_tensor_grad: torch.Tensor, cfg: P2PConfig) -> None:
    """Send the gradient w.r.t. this stage's input to the previous stage."""
    exchange_with_neighbours(cfg, send_prev=input_tensor_grad)


def send_forward_recv_backward(output_tensor: torch.Tensor, cfg: P2PConfig) -> torch.Tensor:
    """Send the activation to the next stage and receive the gradient of it back, batched."""
    return exchange_with_neighbours(cfg, send_next=output_tensor, recv_next=True)[1]


def send_backward_recv_forward(input_tensor_grad: torch.Tensor, cfg: P2PConfig) -> torch.Tensor:
    """Send the input gradient to the previous stage and receive its next activation, batched."""
    return exchange_with_neighbours(cfg, send_prev=input_tensor_grad, recv_prev=True)[0]
