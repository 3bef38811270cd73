"""Contiguous parameter and gradient storage for data parallelism, split into buckets.

A ``ParamAndGradBuffer`` owns ONE flat tensor ``grad_data`` for a set of params sharing
(param dtype, grad dtype, reduction group). Every param gets ``param.main_grad``, a view
of its slice, into which backward hooks accumulate micro-batch grads. The buffer is cut
into ``ParamAndGradBucket``s; each bucket is reduced by one collective, started either
explicitly (``start_grad_sync``) or, with overlap, as soon as its last grad arrives
during the final micro-batch's backward.

Layout (``compute_buffer_layout``):
- params are laid out in REVERSE registration order, roughly the order in which backward
  produces their grads, so that the first bucket fills first;
- a bucket closes once it holds at least ``bucket_size`` elements; a param is never split
  across buckets; with the distributed optimizer the tied word embedding
  (``shared_embedding``) gets a bucket of its own, as in Megatron;
- with the distributed optimizer, each param starts at a multiple of ``PARAM_ALIGNMENT``
  elements and each bucket is padded at its end to a multiple of
  lcm(dp, ``BUCKET_PAD_MULTIPLE``) (lcm(dp, 128, 2**16) with
  ``pad_buckets_for_high_nccl_busbw``), so that it splits into dp equal, aligned shards.
  Without it each param and bucket starts at a multiple of ``GRAD_START_ALIGNMENT``
  elements. Padding stays zero in both buffers.

With the distributed optimizer the params' storage moves into a second flat buffer
``param_data`` of the same layout (``param.data`` becomes a view of it): dp rank r owns
block r of every bucket; the bucket's grads are reduce-scattered into that block and the
updated params all-gathered from every rank's block. With several distributed-optimizer
instances the buffer's group is this rank's instance (dp and padding above are its size):
after the reduce-scatter inside the instance, the block is all-reduced across instances
(``inter_instance_group``), and the params are all-gathered inside the instance only.

With --fp8-param-gather a buffer that holds only FP8 linears' weights (``fp8_weights``)
also owns ``fp8``, an ``fp8.param_gather.Fp8ParamBuffer``: a uint8 twin of ``param_data``
into which the optimizer quantizes its shards; its buckets all-gather those bytes instead
of the bf16 ones, then install the gathered FP8 weights (see that module).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core.distributed.data_parallel_collectives import (
    all_gather_param_bucket,
    all_reduce_grad_bucket,
    reduce_scatter_across_instances,
    reduce_scatter_grad_bucket,
)
from megatron.core.fp8.param_gather import Fp8ParamBuffer, Fp8Weight
from megatron.core.process_groups import group_rank, group_size

logger = logging.getLogger(__name__)

PARAM_ALIGNMENT = 64
"""Elements: with the distributed optimizer every param starts at a multiple of this
(256-byte aligned in fp32), so every param shard a kernel sees is aligned."""

GRAD_START_ALIGNMENT = 8
"""Elements: without the distributed optimizer every param still starts at a multiple of
this (32 bytes in fp32, 16 in bf16). The weight-gradient GEMMs accumulate straight into
``main_grad``; a slice that is only 8-byte aligned (after an odd-sized param such as a
30522-entry output bias) makes cuBLAS fall back from the Hopper TMA kernels to older ones
that run the same GEMM about half as fast."""

BUCKET_PAD_MULTIPLE = 128
"""With the distributed optimizer a bucket's padded size is a multiple of lcm(dp, 128)."""

HIGH_NCCL_BUSBW_PAD_MULTIPLE = 2**16
"""Extra factor of the bucket padding with --ddp-pad-buckets-for-high-nccl-busbw."""


@dataclass(frozen=True)
class BufferLayout:
    """Where each param and bucket lives in a flat buffer (all ranges are [start, end)).

    ``param_ranges[i]`` and ``bucket_of_param[i]`` are for the i-th param in buffer order;
    ``bucket_ranges`` are padded; ``bucket_numel_unpadded[b]`` is the end of bucket b's
    last param minus the bucket's start.
    """

    param_ranges: Tuple[Tuple[int, int], ...]
    bucket_of_param: Tuple[int, ...]
    bucket_ranges: Tuple[Tuple[int, int], ...]
    bucket_numel_unpadded: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.bucket_ranges[-1][1]

    @property
    def numel_unpadded(self) -> int:
        return sum(end - start for start, end in self.param_ranges)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket_pad_multiple(dp_size: int, pad_buckets_for_high_nccl_busbw: bool = False) -> int:
    """The multiple every bucket is padded to with the distributed optimizer."""
    multiple = math.lcm(dp_size, BUCKET_PAD_MULTIPLE)
    return math.lcm(multiple, HIGH_NCCL_BUSBW_PAD_MULTIPLE) if pad_buckets_for_high_nccl_busbw else multiple


def compute_buffer_layout(
    numels: Sequence[int],
    bucket_size: Optional[int],
    dp_size: int,
    use_distributed_optimizer: bool,
    pad_buckets_for_high_nccl_busbw: bool = False,
    own_bucket: Optional[Sequence[bool]] = None,
) -> BufferLayout:
    """Layout of params with ``numels`` (already in buffer order) in one flat buffer.

    ``bucket_size`` None means one bucket. ``own_bucket[i]`` puts param i alone in a
    bucket (with the distributed optimizer, the tied word embedding: then the first and
    last pipeline stage shard it identically, so its grads can be all-reduced between
    the stages after the dp reduce-scatter). See the module docstring for the rules.
    """
    if not numels:
        raise ValueError("a ParamAndGradBuffer needs at least one parameter")
    multiple = bucket_pad_multiple(dp_size, pad_buckets_for_high_nccl_busbw)
    own_bucket = list(own_bucket) if own_bucket is not None else [False] * len(numels)
    param_ranges, bucket_of_param, bucket_ranges, unpadded = [], [], [], []
    offset = bucket_start = 0

    def close_bucket(end: int) -> int:
        padded_end = _round_up(end, multiple if use_distributed_optimizer else GRAD_START_ALIGNMENT)
        bucket_ranges.append((bucket_start, padded_end))
        unpadded.append(end - bucket_start)
        return padded_end

    def bucket_open() -> bool:
        return bool(bucket_of_param) and bucket_of_param[-1] == len(bucket_ranges)

    for numel, alone in zip(numels, own_bucket):
        if alone and bucket_open():
            offset = bucket_start = close_bucket(offset)
        start = _round_up(offset, PARAM_ALIGNMENT if use_distributed_optimizer else GRAD_START_ALIGNMENT)
        end = start + numel
        param_ranges.append((start, end))
        bucket_of_param.append(len(bucket_ranges))
        offset = end
        if alone or (bucket_size is not None and end - bucket_start >= bucket_size):
            offset = bucket_start = close_bucket(end)
    if bucket_open():
        close_bucket(offset)
    return BufferLayout(tuple(param_ranges), tuple(bucket_of_param), tuple(bucket_ranges), tuple(unpadded))


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class ParamAndGradBucket:
    """A slice of a buffer reduced (and, with the distributed optimizer, gathered) by one
    collective.

    ``grad_data`` / ``param_data`` are 1-D views of the owning buffer's storage (padding
    included; ``param_data`` is None without the distributed optimizer); ``offset`` is
    their start in the buffer. ``gradient_scaling_factor`` multiplies the grads before
    the collective (1/dp to average with a SUM; 1.0 for per-token loss or AVG). With the
    distributed optimizer ``grad_shard`` / ``param_shard`` are this dp rank's block, and
    ``inter_instance_group`` (None with one instance) the group across which that block's
    grads are all-reduced after the reduce-scatter over ``data_parallel_group``.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_data: torch.Tensor,
        param_data: Optional[torch.Tensor],
        offset: int,
        numel_unpadded: int,
        bucket_id: int,
        data_parallel_group,
        gradient_scaling_factor: float,
        reduce_op,
        overlap_grad_reduce: bool,
        check_for_nan_in_grad: bool,
        inter_instance_group=None,
        fp8: Optional[Fp8ParamBuffer] = None,
    ) -> None:
        self.params = list(params)
        self.params_set = set(self.params)
        self.grad_data = grad_data
        self.param_data = param_data
        self.offset = offset
        self.numel_unpadded = numel_unpadded
        self.bucket_id = bucket_id
        self.data_parallel_group = data_parallel_group
        self.inter_instance_group = inter_instance_group
        self.gradient_scaling_factor = gradient_scaling_factor
        self.reduce_op = reduce_op
        self.overlap_grad_reduce = overlap_grad_reduce
        self.check_for_nan_in_grad = check_for_nan_in_grad
        self.use_distributed_optimizer = param_data is not None
        self.is_last_microbatch = True
        self.param_gather_handle = None
        self.grad_shard = self.param_shard = None
        if self.use_distributed_optimizer:
            dp, rank = group_size(data_parallel_group), group_rank(data_parallel_group)
            self.shard_numel = grad_data.numel() // dp
            block = slice(rank * self.shard_numel, (rank + 1) * self.shard_numel)
            self.grad_shard, self.param_shard = grad_data[block], param_data[block]
        # --fp8-param-gather: the bucket's FP8 bytes are gathered instead of param_data
        self.fp8 = fp8 if self.use_distributed_optimizer else None
        if self.fp8 is not None:
            self.fp8_data = fp8.data[offset:offset + grad_data.numel()]
            self.fp8_shard = self.fp8_data[block]
        self.reset()

    def reset(self) -> None:
        """Forget grads seen and any pending grad collective (after a finished sync)."""
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
        """Scale this bucket's grads and launch their reduction (async when overlapping):
        an all-reduce, or a reduce-scatter into ``grad_shard`` with the distributed optimizer
        (followed by the all-reduce of ``grad_shard`` across instances when there are several)."""
        if self.grad_reduce_handle is not None:
            return
        if self.check_for_nan_in_grad:
            self._check_for_nan()
        if self.gradient_scaling_factor != 1.0:
            self.grad_data.mul_(self.gradient_scaling_factor)
        group, op, async_op = self.data_parallel_group, self.reduce_op, self.overlap_grad_reduce
        if self.use_distributed_optimizer and group_size(self.inter_instance_group) > 1:
            handle = reduce_scatter_across_instances(self.grad_data, self.grad_shard, group, self.inter_instance_group,
                                                     op=op, async_op=async_op)
        elif self.use_distributed_optimizer:
            handle = reduce_scatter_grad_bucket(self.grad_data, self.grad_shard, group, op=op, async_op=async_op)
        else:
            handle = all_reduce_grad_bucket(self.grad_data, group, op=op, async_op=async_op)
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

    def start_param_sync(self, async_op: bool = False) -> None:
        """Distributed optimizer only: all-gather every rank's updated ``param_shard`` into
        ``param_data`` (the model params). Waits for a gather still pending first."""
        if not self.use_distributed_optimizer:
            return
        self.finish_param_sync()
        if self.fp8 is not None:
            # one byte per element: the FP8 weights the optimizer quantized into fp8_shard
            self.param_gather_handle = all_gather_param_bucket(
                self.fp8_data, self.fp8_shard, self.data_parallel_group, async_op=async_op
            )
            if self.param_gather_handle is None:
                self._install_fp8()
            return
        self.param_gather_handle = all_gather_param_bucket(
            self.param_data, self.param_shard, self.data_parallel_group, async_op=async_op
        )

    def finish_param_sync(self) -> None:
        """Wait for this bucket's pending param all-gather, if any (and with
        --fp8-param-gather hand the gathered FP8 weights to their linears)."""
        if self.param_gather_handle is not None:
            self.param_gather_handle.wait()
            self.param_gather_handle = None
            if self.fp8 is not None:
                self._install_fp8()

    def _install_fp8(self) -> None:
        self.fp8.install(self.offset, self.offset + self.grad_data.numel())


class ParamAndGradBuffer:
    """Flat grad (and, with the distributed optimizer, param) storage of ``params``.

    After construction every param has ``param.main_grad`` (same shape as the param,
    dtype ``grad_dtype``) viewing ``grad_data``; with ``use_distributed_optimizer`` its
    ``.data`` views ``param_data`` (same dtype as before). ``bucket_size`` (elements)
    closes a bucket once reached; None means one bucket. ``param_index_map[param]`` is
    ``(start, end, bucket_id)`` in the buffer. ``inter_instance_group``: see
    ``ParamAndGradBucket``.
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
        use_distributed_optimizer: bool = False,
        pad_buckets_for_high_nccl_busbw: bool = False,
        inter_instance_group=None,
        fp8_weights: Optional[Dict[torch.nn.Parameter, Fp8Weight]] = None,
    ) -> None:
        if not params:
            raise ValueError("a ParamAndGradBuffer needs at least one parameter")
        self.params = list(params)
        self.grad_dtype = grad_dtype
        self.param_dtype = self.params[0].dtype
        if any(p.dtype != self.param_dtype for p in self.params):
            raise ValueError("all params of one ParamAndGradBuffer must share a dtype; group them by dtype")
        self.data_parallel_group = data_parallel_group
        self.inter_instance_group = inter_instance_group
        self.use_distributed_optimizer = use_distributed_optimizer
        order = list(reversed(self.params))
        self.layout = compute_buffer_layout(
            [p.numel() for p in order], bucket_size, group_size(data_parallel_group),
            use_distributed_optimizer, pad_buckets_for_high_nccl_busbw,
            own_bucket=[use_distributed_optimizer and getattr(p, "shared_embedding", False) for p in order],
        )
        self.numel = self.layout.numel
        self.numel_unpadded = self.layout.numel_unpadded
        device = order[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = None
        if use_distributed_optimizer:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.param_index_map: Dict[torch.nn.Parameter, Tuple[int, int, int]] = {}
        for p, (start, end), bucket_id in zip(order, self.layout.param_ranges, self.layout.bucket_of_param):
            self._place(p, start, end)
            self.param_index_map[p] = (start, end, bucket_id)
        self.fp8: Optional[Fp8ParamBuffer] = None
        if fp8_weights:
            if not use_distributed_optimizer or any(p not in fp8_weights for p in order):
                raise ValueError("--fp8-param-gather: an FP8 param buffer needs the distributed optimizer and only "
                                 "FP8 linears' weights in it")
            self.fp8 = Fp8ParamBuffer([(p, self.layout.param_ranges[i], fp8_weights[p]) for i, p in enumerate(order)],
                                      self.numel, device, data_parallel_group)
        self.buckets: List[ParamAndGradBucket] = []
        self.param_to_bucket: Dict[torch.nn.Parameter, ParamAndGradBucket] = {}
        self._build_buckets(order, gradient_scaling_factor, reduce_op, overlap_grad_reduce, check_for_nan_in_grad)
        logger.debug(
            "param/grad buffer: %d params, %d elements (%d unpadded) of %s in %d bucket(s)",
            len(order), self.numel, self.numel_unpadded, grad_dtype, len(self.buckets),
        )

    def _place(self, param: torch.nn.Parameter, start: int, end: int) -> None:
        """Point ``param.main_grad`` (and ``param.data`` with the distributed optimizer)
        at its slice of the buffers."""
        param.main_grad = self.grad_data[start:end].view(param.shape)
        if self.param_data is not None:
            self.param_data[start:end].copy_(param.data.reshape(-1))
            param.data = self.param_data[start:end].view(param.shape)

    def _build_buckets(self, order, scaling, reduce_op, overlap_grad_reduce, check_for_nan_in_grad) -> None:
        for bucket_id, (start, end) in enumerate(self.layout.bucket_ranges):
            bucket_params = [p for p, b in zip(order, self.layout.bucket_of_param) if b == bucket_id]
            bucket = ParamAndGradBucket(
                bucket_params,
                self.grad_data[start:end],
                None if self.param_data is None else self.param_data[start:end],
                start,
                self.layout.bucket_numel_unpadded[bucket_id],
                bucket_id,
                self.data_parallel_group,
                scaling,
                reduce_op,
                overlap_grad_reduce,
                check_for_nan_in_grad,
                self.inter_instance_group,
                self.fp8,
            )
            self.buckets.append(bucket)
            for p in bucket_params:
                self.param_to_bucket[p] = bucket

    def reset(self) -> None:
        """Zero the grads and forget any bucket state (start of an iteration)."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply every grad of the buffer by ``scaling_factor`` (e.g. 1/num_tokens)."""
        self.grad_data.mul_(scaling_factor)
