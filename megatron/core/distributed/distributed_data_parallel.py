"""``DistributedDataParallel``: contiguous grad buffers and their data-parallel reduction.

The wrapped module's params get ``param.main_grad`` views into one flat buffer per
(param dtype, grad dtype, dense/expert) kind. Backward hooks add each ``param.grad``
into ``main_grad`` and free ``param.grad``, so micro-batch grads sum in the buffer.
``finish_grad_sync`` (called by ``finalize_model_grads``) reduces the buffers: dense
params over the data x context parallel group, expert params (attribute
``allreduce=False``) over the expert data-parallel group, averaging by 1/dp_cp unless
the loss is per token. The reduction is an all-reduce, or with the distributed
optimizer a reduce-scatter (each dp rank keeps the reduced block it owns); the
optimizer then calls ``start_param_sync`` to all-gather the updated params. With
``overlap_param_gather`` that gather is asynchronous and forward pre-hooks wait for
each bucket just before the first module that uses its params runs; code that reads
all params outside forward (checkpoint save, a params norm) must call
``finish_param_sync()`` first (``state_dict()`` does).

With ``num_distributed_optimizer_instances`` N > 1 (distributed optimizer only) the
buffers shard over this rank's instance (``pg_collection.intra_dp_cp``, D/N consecutive
data x context parallel ranks; ``intra_expt_dp`` for expert params) and each reduced
block is then all-reduced across the instances (``inter_dist_opt`` /
``inter_expt_dist_opt``): every instance ends with the same grads and, after the same
optimizer step, the same params, which it all-gathers inside itself.

With ``fp8_param_gather`` the weights of the FP8 linears form buffers of their own,
whose buckets all-gather FP8 bytes quantized from the master shards
(``megatron.core.fp8.param_gather``); the other params keep their buffers.

Bucket size: as in Megatron, without ``overlap_grad_reduce`` there is one bucket per
buffer (there is nothing to overlap with); with it the default is
max(40M, 1M x the sharding group's size) elements (dp_cp, or one instance of it).
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
from megatron.core.fp8.param_gather import fp8_weights
from megatron.core.process_groups import ProcessGroups, group_size

logger = logging.getLogger(__name__)


def broadcast_from_group_rank0(tensor: torch.Tensor, group) -> None:
    """Forward: overwrite ``tensor`` in place with its value on rank 0 of ``group``.
    Backward: not differentiable (used on ``param.data``). No-op for a 1-rank group."""
    if group_size(group) == 1:
        return
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def default_bucket_size(ddp_config: DistributedDataParallelConfig, dp_cp_size: int) -> Optional[int]:
    """Megatron's rule: one bucket (None) without --overlap-grad-reduce; else
    --ddp-bucket-size, by default max(40M, 1M x dp_cp) elements (``dp_cp_size``: the size
    of the group a bucket is sharded or reduced over)."""
    if not ddp_config.overlap_grad_reduce:
        if ddp_config.bucket_size is not None:
            logger.info("--ddp-bucket-size is ignored without --overlap-grad-reduce: one bucket per buffer")
        return None
    if ddp_config.bucket_size is not None:
        return ddp_config.bucket_size
    return max(40_000_000, 1_000_000 * dp_cp_size)


def _is_expert_param(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def _instance_groups(pgs: ProcessGroups, num_instances: int, dp_cp_group, expt_dp_group) -> Tuple:
    """(intra dense, intra expert, inter dense, inter expert) groups of ``num_instances``
    distributed-optimizer instances; with one, the whole data-parallel groups and no inter."""
    if num_instances == 1:
        return dp_cp_group, expt_dp_group, None, None
    intra, inter = pgs.intra_dp_cp, pgs.inter_dist_opt
    built = 1 if intra is None else group_size(dp_cp_group) // group_size(intra)
    if built != num_instances or group_size(inter) != num_instances:
        raise ValueError(
            f"--num-distributed-optimizer-instances {num_instances}: the process groups hold {built} instance(s); "
            f"build them with parallel_state.initialize_model_parallel(num_distributed_optimizer_instances="
            f"{num_instances}) or pass a ProcessGroups with intra_dp_cp and inter_dist_opt"
        )
    if pgs.expt_dp is None:  # no expert grid: expert params (if any) reduce like dense ones
        return intra, intra, inter, inter
    return intra, pgs.intra_expt_dp, inter, pgs.inter_expt_dist_opt


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
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        pgs = process_groups.resolve(pg_collection)
        self.pg_collection = pgs
        self.dp_cp_group = pgs.dp_cp
        self.expt_dp_group = pgs.expt_dp if pgs.expt_dp is not None else pgs.dp_cp
        (self.intra_dp_cp_group, self.intra_expt_dp_group, self.inter_dist_opt_group,
         self.inter_expt_dist_opt_group) = _instance_groups(
            pgs, ddp_config.num_distributed_optimizer_instances, self.dp_cp_group, self.expt_dp_group)
        self.buffers: List[ParamAndGradBuffer] = []
        self.expert_parallel_buffers: List[ParamAndGradBuffer] = []
        bucket_size = None if disable_bucketing else default_bucket_size(ddp_config, group_size(self.intra_dp_cp_group))
        self._build_buffers(bucket_size)
        self.param_to_bucket = {}
        for buffer in self.buffers + self.expert_parallel_buffers:
            self.param_to_bucket.update(buffer.param_to_bucket)
        self._hook_handles = [
            param.register_post_accumulate_grad_hook(self._make_grad_hook())
            for param in self.param_to_bucket
        ]
        self._forward_pre_hook_handles = []
        if ddp_config.overlap_param_gather:
            self.enable_forward_pre_hook()

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

    def _fp8_weights(self) -> dict:
        """The FP8 linears' weights gathered in FP8 (empty without --fp8-param-gather)."""
        if not self.ddp_config.fp8_param_gather:
            return {}
        weights = fp8_weights(self.module)
        if not weights:
            logger.warning("--fp8-param-gather: this model chunk has no FP8 linear (no --fp8-format, or all its "
                           "layers kept in bf16); its params are gathered as without the flag")
        return weights

    def _build_buffers(self, bucket_size: Optional[int]) -> None:
        groups: Dict[tuple, List[torch.nn.Parameter]] = OrderedDict()
        fp8 = self._fp8_weights()
        for param in self.module.parameters():
            if not param.requires_grad:
                continue
            grad_dtype = torch.float32 if self.ddp_config.grad_reduce_in_fp32 else param.dtype
            key = (param.dtype, grad_dtype, _is_expert_param(param), param in fp8)
            groups.setdefault(key, []).append(param)
            param.grad_added_to_main_grad = False
        for (_, grad_dtype, expert, in_fp8), params in groups.items():
            if expert and self.intra_expt_dp_group is None:
                raise ValueError(
                    "--num-distributed-optimizer-instances with expert params needs the expert instance groups: "
                    "pass a ProcessGroups with intra_expt_dp and inter_expt_dist_opt (initialize_model_parallel "
                    "builds them)"
                )
            factor, op = self._scaling(expert)
            buffer = ParamAndGradBuffer(
                params,
                grad_dtype,
                self.intra_expt_dp_group if expert else self.intra_dp_cp_group,
                factor,
                reduce_op=op,
                bucket_size=bucket_size,
                overlap_grad_reduce=self.ddp_config.overlap_grad_reduce,
                check_for_nan_in_grad=self.ddp_config.check_for_nan_in_grad,
                use_distributed_optimizer=self.ddp_config.use_distributed_optimizer,
                pad_buckets_for_high_nccl_busbw=self.ddp_config.pad_buckets_for_high_nccl_busbw,
                inter_instance_group=self.inter_expt_dist_opt_group if expert else self.inter_dist_opt_group,
                fp8_weights={p: fp8[p] for p in params} if in_fp8 else None,
            )
            (self.expert_parallel_buffers if expert else self.buffers).append(buffer)
            instances = self.ddp_config.num_distributed_optimizer_instances
            logger.info(
                "DDP grad buffer: %d %s%s params, %d elements (%d padded) of %s in %d bucket(s), %s over %s%s",
                len(params), "expert" if expert else "dense", " FP8-gathered" if in_fp8 else "",
                buffer.numel_unpadded, buffer.numel, grad_dtype,
                len(buffer.buckets), "reduce-scattered" if buffer.use_distributed_optimizer else "all-reduced",
                "expert dp" if expert else "dp x cp",
                f" in each of {instances} instances, then all-reduced across them" if instances > 1 else "",
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

    def defer_grad_reduction(self) -> None:
        """From now on every bucket's reduction launches in ``finish_grad_sync``, none from the
        backward hooks: a replayed CUDA graph runs the backward's kernels but no Python hook, so
        an overlapped launch would happen once at capture and never again."""
        for bucket in self._all_buckets():
            bucket.overlap_grad_reduce = False

    def start_grad_sync(self, *unused) -> None:
        """Launch the reduction of every bucket not launched yet."""
        for bucket in self._all_buckets():
            bucket.start_grad_sync()

    def finish_grad_sync(self) -> None:
        """Complete every bucket's reduction (launching those not started)."""
        for bucket in self._all_buckets():
            bucket.finish_grad_sync()

    def start_param_sync(self, async_op: bool = False) -> None:
        """Distributed optimizer: all-gather the updated params of every bucket (async
        with ``async_op``; forward pre-hooks or ``finish_param_sync`` then wait)."""
        for bucket in self._all_buckets():
            bucket.start_param_sync(async_op=async_op)

    def finish_param_sync(self) -> None:
        """Wait for every pending param all-gather (before reading all params)."""
        for bucket in self._all_buckets():
            bucket.finish_param_sync()

    def _make_forward_pre_hook(self):
        """Wait for the all-gather of the buckets of a module's own params before it runs."""

        def hook(module: torch.nn.Module, *unused) -> None:
            for param in module.parameters(recurse=False):
                bucket = self.param_to_bucket.get(param)
                if bucket is not None:
                    bucket.finish_param_sync()

        return hook

    def enable_forward_pre_hook(self) -> None:
        """Register the per-module waits used with ``overlap_param_gather``."""
        if not self._forward_pre_hook_handles:
            hook = self._make_forward_pre_hook()
            self._forward_pre_hook_handles = [m.register_forward_pre_hook(hook) for m in self.module.modules()]

    def disable_forward_pre_hook(self) -> None:
        """Remove the per-module waits, finishing any pending param all-gather."""
        for handle in self._forward_pre_hook_handles:
            handle.remove()
        self._forward_pre_hook_handles = []
        self.finish_param_sync()

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
        self.finish_param_sync()
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if assign and self.ddp_config.use_distributed_optimizer:
            # assign=True would replace the params' storage, cutting them off the param buffer.
            raise ValueError("load_state_dict(assign=True) is not supported with --use-distributed-optimizer; "
                             "load with assign=False (copies into the existing params)")
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def sharded_state_dict(self, *args, **kwargs):
        """Delegates to the module (distributed checkpointing)."""
        return self.module.sharded_state_dict(*args, **kwargs)
