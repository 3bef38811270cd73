"""``DistributedDataParallel``: contiguous grad buffers and their data-parallel reduction.

The wrapped module's params get ``param.main_grad`` views into one flat buffer per
(param dtype, grad dtype, dense/expert) kind. Backward hooks add each ``param.grad``
into ``main_grad`` and free ``param.grad``, so micro-batch grads sum in the buffer.
``finish_grad_sync`` (called by ``finalize_model_grads``) all-reduces the buffers:
dense params over the data x context parallel group, expert params (attribute
``allreduce=False``) over the expert data-parallel group, averaging by 1/dp_cp unless
the loss is per token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import process_groups
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.param_and_grad_buffer import ParamAndGradBuffer
from megatron.core.process_groups import ProcessGroups, group_size

logger = logging.getLogger(__name__)


def broadcast_from_group_rank0(tensor: torch.Tensor, group) -> None:
    """Forward: overwrite ``tensor`` in place with its value on rank 0 of ``group``.
    Backward: not differentiable (used on ``param.data``). No-op for a 1-rank group."""
    if group_size(group) == 1:
        return
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def _is_expert_param(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def _supports_avg(group) -> bool:
    """ReduceOp.AVG exists only on NCCL; gloo falls back to scaling + SUM."""
    return dist.is_initialized() and dist.get_backend(group) == "nccl"


class DistributedDataParallel(torch.nn.Module):
    """Wraps ``module`` (kept as ``.module``; forward delegates) for data parallelism.

    Args:
        config: the model's ``TransformerConfig`` (``calculate_per_token_loss`` turns
            the 1/dp averaging off: ``finalize_model_grads`` divides by the token count).
        ddp_config: ``DistributedDataParallelConfig``.
        module: the model chunk.
        disable_bucketing: one bucket per buffer even if ``ddp_config.bucket_size`` is set.
        pg_collection: groups; the default ``ProcessGroups`` when None (taken once here).
    """

    def __init__(
        self,
        config,
        ddp_config: DistributedDataParallelConfig,
        module: torch.nn.Module,
        disable_bucketing: bool = False,
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        super().__init__()
        if ddp_config.use_distributed_optimizer:
            raise NotImplementedError(
                "--use-distributed-optimizer is not implemented yet; drop the flag to train with "
                "replicated optimizer state"
            )
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        pgs = process_groups.resolve(pg_collection)
        self.pg_collection = pgs
        self.dp_cp_group = pgs.dp_cp
        self.expt_dp_group = pgs.expt_dp if pgs.expt_dp is not None else pgs.dp_cp
        bucket_size = None if disable_bucketing else ddp_config.bucket_size
        self.buffers: List[ParamAndGradBuffer] = []
        self.expert_parallel_buffers: List[ParamAndGradBuffer] = []
        self._build_buffers(bucket_size)
        self.param_to_bucket = {}
        for buffer in self.buffers + self.expert_parallel_buffers:
            self.param_to_bucket.update(buffer.param_to_bucket)
        self._hook_handles = [
            param.register_post_accumulate_grad_hook(self._make_grad_hook())
            for param in self.param_to_bucket
        ]

    def _scaling(self, expert: bool) -> Tuple[float, object]:
        """(pre-collective grad multiplier, reduce op) for dense or expert buffers."""
        dp_cp = group_size(self.dp_cp_group)
        if getattr(self.config, "calculate_per_token_loss", False):
            return 1.0, dist.ReduceOp.SUM
        group = self.expt_dp_group if expert else self.dp_cp_group
        if self.ddp_config.average_in_collective and _supports_avg(group):
            # AVG divides by the group's size; expert grads must still end up / dp_cp.
            factor = group_size(self.expt_dp_group) / dp_cp if expert else 1.0
            return factor, dist.ReduceOp.AVG
        return 1.0 / dp_cp, dist.ReduceOp.SUM

    def _build_buffers(self, bucket_size: Optional[int]) -> None:
        groups: Dict[tuple, List[torch.nn.Parameter]] = OrderedDict()
        for param in self.module.parameters():
            if not param.requires_grad:
                continue
            grad_dtype = torch.float32 if self.ddp_config.grad_reduce_in_fp32 else param.dtype
            key = (param.dtype, grad_dtype, _is_expert_param(param))
            groups.setdefault(key, []).append(param)
            param.grad_added_to_main_grad = False
        for (_, grad_dtype, expert), params in groups.items():
            factor, op = self._scaling(expert)
            buffer = ParamAndGradBuffer(
                params,
                grad_dtype,
                self.expt_dp_group if expert else self.dp_cp_group,
                factor,
                reduce_op=op,
                bucket_size=bucket_size,
                overlap_grad_reduce=self.ddp_config.overlap_grad_reduce,
                check_for_nan_in_grad=self.ddp_config.check_for_nan_in_grad,
            )
            (self.expert_parallel_buffers if expert else self.buffers).append(buffer)
            logger.info(
                "DDP grad buffer: %d %s params, %d elements of %s in %d bucket(s), reduced over %s",
                len(params), "expert" if expert else "dense", buffer.numel, grad_dtype, len(buffer.buckets),
                "expert dp" if expert else "dp x cp",
            )

    def _make_grad_hook(self):
        """The hook run after autograd accumulated a param's grad: move it into main_grad."""

        def hook(param: torch.nn.Parameter) -> None:
            grad = param.grad
            # After an FP32Optimizer step .grad may still alias main_grad (if zero_grad
            # was skipped); autograd then accumulated into main_grad in place already.
            aliased = grad is not None and grad.data_ptr() == param.main_grad.data_ptr()
            if grad is not None and not aliased and not param.grad_added_to_main_grad:
                param.main_grad.add_(grad)
            param.grad = None
            if self.ddp_config.overlap_grad_reduce:
                self.param_to_bucket[param].register_grad_ready(param)

        return hook

    def _all_buckets(self):
        for buffer in self.buffers + self.expert_parallel_buffers:
            yield from buffer.buckets

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    @contextmanager
    def no_sync(self):
        """Inside: backward only accumulates (no overlapped reduction is launched)."""
        for bucket in self._all_buckets():
            bucket.is_last_microbatch = False
        try:
            yield
        finally:
            for bucket in self._all_buckets():
                bucket.is_last_microbatch = True

    def start_grad_sync(self, *unused) -> None:
        """Launch the reduction of every bucket not launched yet."""
        for bucket in self._all_buckets():
            bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Complete every bucket's reduction (launching those not started)."""
        for bucket in self._all_buckets():
            bucket.finish_grad_sync()

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply all main grads by ``scaling_factor``."""
        for buffer in self.buffers + self.expert_parallel_buffers:
            buffer.scale_gradients(scaling_factor)

    def zero_grad_buffer(self) -> None:
        """Zero all main grads; call at the start of every iteration."""
        for param in self.param_to_bucket:
            param.grad_added_to_main_grad = False
        for buffer in self.buffers + self.expert_parallel_buffers:
            buffer.reset()

    def broadcast_params(self) -> None:
        """Make every data-parallel replica start from the params of dp rank 0."""
        for param in self.module.parameters():
            group = self.expt_dp_group if _is_expert_param(param) else self.dp_cp_group
            broadcast_from_group_rank0(param.data, group)

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def sharded_state_dict(self, *args, **kwargs):
        """Delegates to the module (distributed checkpointing)."""
        return self.module.sharded_state_dict(*args, **kwargs)
