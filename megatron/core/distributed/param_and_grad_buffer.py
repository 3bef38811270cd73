"""Contiguous gradient storage for data parallelism, split into buckets.

A ``ParamAndGradBuffer`` owns ONE flat tensor ``grad_data`` for a set of params sharing
(param dtype, grad dtype, reduction group). Every param gets ``param.main_grad``, a view
of its slice, into which backward hooks accumulate micro-batch grads. The buffer is cut
into ``ParamAndGradBucket``s (one bucket unless a bucket size is given); each bucket is
reduced by one collective, started either explicitly (``start_grad_sync``) or, with
overlap, as soon as its last grad arrives during the final micro-batch's backward.

Layout: params are laid out in REVERSE registration order, i.e. roughly the order in
which backward produces their grads, so that the first bucket fills first. The
distributed optimizer will later need each bucket padded to a multiple of the dp size
and a reduce-scatter instead of the all-reduce; both fit in this structure (bucket
boundaries and the collective function are the only things that change).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_size

logger = logging.getLogger(__name__)


def all_reduce_grad_bucket(grad_data: torch.Tensor, group, op=None, async_op: bool = False):
    """Forward: sum (or ``op``) ``grad_data`` in place over ``group``; returns the async
    handle when ``async_op`` else None. Backward: not differentiable (runs on .main_grad
    outside autograd). A no-op when the group has one rank."""
    if group_size(group) == 1:
        return None
    return dist.all_reduce(grad_data, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class ParamAndGradBucket:
    """A slice of a buffer reduced by one collective.

    ``grad_data`` is a 1-D view of the owning buffer's storage; ``offset`` its start in
    the buffer. ``gradient_scaling_factor`` multiplies the grads before the collective
    (1/dp to average with a SUM all-reduce; 1.0 for per-token loss or AVG).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_data: torch.Tensor,
        offset: int,
        bucket_id: int,
        data_parallel_group,
        gradient_scaling_factor: float,
        reduce_op,
        overlap_grad_reduce: bool,
        check_for_nan_in_grad: bool,
    ) -> None:
        self.params = list(params)
        self.params_set = set(self.params)
        self.grad_data = grad_data
        self.offset = offset
        self.bucket_id = bucket_id
        self.data_parallel_group = data_parallel_group
        self.gradient_scaling_factor = gradient_scaling_factor
        self.reduce_op = reduce_op
        self.overlap_grad_reduce = overlap_grad_reduce
        self.check_for_nan_in_grad = check_for_nan_in_grad
        self.is_last_microbatch = True
        self.reset()

    def reset(self) -> None:
        """Forget grads seen and any pending collective (after a finished sync)."""
        self.params_with_grad = set()
        self.grad_reduce_handle = None

    def _check_for_nan(self) -> None:
        norm = self.grad_data.float().norm(p=2)
        if not torch.isfinite(norm):
            raise RuntimeError(
                f"rank {_global_rank()}: found NaN/Inf in the local gradients of bucket "
                f"{self.bucket_id} before the data-parallel reduction (local grad norm {norm.item()}); "
                "lower the learning rate or check the data and loss"
            )

    def start_grad_sync(self) -> None:
        """Scale this bucket's grads and launch its reduction (async when overlapping)."""
        if self.grad_reduce_handle is not None:
            return
        if self.check_for_nan_in_grad:
            self._check_for_nan()
        if self.gradient_scaling_factor != 1.0:
            self.grad_data.mul_(self.gradient_scaling_factor)
        handle = all_reduce_grad_bucket(
            self.grad_data, self.data_parallel_group, op=self.reduce_op, async_op=self.overlap_grad_reduce
        )
        # A finished synchronous reduction is marked by a sentinel so it is not redone.
        self.grad_reduce_handle = handle if handle is not None else True

    def finish_grad_sync(self) -> None:
        """Make sure the reduction has run and completed; then reset for the next step."""
        if self.grad_reduce_handle is None:
            self.start_grad_sync()
        if self.grad_reduce_handle is not True:
            self.grad_reduce_handle.wait()
        self.reset()

    def register_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Called by the backward hook of ``param``; launches the reduction once every
        param of the bucket has its grad, in the last micro-batch only."""
        if not (self.overlap_grad_reduce and self.is_last_microbatch):
            return
        self.params_with_grad.add(param)
        if len(self.params_with_grad) == len(self.params):
            self.start_grad_sync()


class ParamAndGradBuffer:
    """Flat grad storage of ``params`` in ``grad_dtype``, split into buckets.

    After construction every param has ``param.main_grad`` (same shape as the param,
    dtype ``grad_dtype``) viewing ``grad_data``. ``bucket_size`` (elements) caps each
    bucket; a param is never split across buckets; None means one bucket.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        data_parallel_group,
        gradient_scaling_factor: float,
        reduce_op=None,
        bucket_size: Optional[int] = None,
        overlap_grad_reduce: bool = False,
        check_for_nan_in_grad: bool = False,
    ) -> None:
        if not params:
            raise ValueError("a ParamAndGradBuffer needs at least one parameter")
        self.params = list(params)
        self.grad_dtype = grad_dtype
        self.param_dtype = self.params[0].dtype
        self.data_parallel_group = data_parallel_group
        order = list(reversed(self.params))
        self.numel = sum(p.numel() for p in order)
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=order[0].device)
        self.param_index_map: Dict[torch.nn.Parameter, tuple] = {}
        spans = self._bucket_spans(order, bucket_size)
        self.buckets: List[ParamAndGradBucket] = []
        self.param_to_bucket: Dict[torch.nn.Parameter, ParamAndGradBucket] = {}
        offset = 0
        for bucket_id, bucket_params in enumerate(spans):
            start = offset
            for p in bucket_params:
                end = offset + p.numel()
                p.main_grad = self.grad_data[offset:end].view(p.shape)
                self.param_index_map[p] = (offset, end, bucket_id)
                offset = end
            bucket = ParamAndGradBucket(
                bucket_params, self.grad_data[start:offset], start, bucket_id, data_parallel_group,
                gradient_scaling_factor, reduce_op, overlap_grad_reduce, check_for_nan_in_grad,
            )
            self.buckets.append(bucket)
            for p in bucket_params:
                self.param_to_bucket[p] = bucket
        logger.debug(
            "grad buffer: %d params, %d elements of %s in %d bucket(s)", len(order), self.numel, grad_dtype, len(self.buckets)
        )

    @staticmethod
    def _bucket_spans(order: List[torch.nn.Parameter], bucket_size: Optional[int]) -> List[List[torch.nn.Parameter]]:
        if bucket_size is None:
            return [order]
        spans: List[List[torch.nn.Parameter]] = [[]]
        filled = 0
        for p in order:
            if spans[-1] and filled + p.numel() > bucket_size:
                spans.append([])
                filled = 0
            spans[-1].append(p)
            filled += p.numel()
        return spans

    def reset(self) -> None:
        """Zero the grads and forget any bucket state (start of an iteration)."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply every grad of the buffer by ``scaling_factor`` (e.g. 1/num_tokens)."""
        self.grad_data.mul_(scaling_factor)
