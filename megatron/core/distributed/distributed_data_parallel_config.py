"""Settings of ``DistributedDataParallel`` (Megatron-Core field names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DistributedDataParallelConfig:
    """How gradients are stored and reduced across data-parallel ranks."""

    grad_reduce_in_fp32: bool = False
    """Accumulate and all-reduce gradients in fp32 whatever the param dtype
    (--accumulate-allreduce-grads-in-fp32)."""

    overlap_grad_reduce: bool = False
    """Start each bucket's gradient reduction as soon as its grads are ready during the
    last micro-batch's backward (--overlap-grad-reduce)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's param all-gather with the next forward
    (--overlap-param-gather); needs the distributed optimizer and --overlap-grad-reduce."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (--use-distributed-optimizer)."""

    num_distributed_optimizer_instances: int = 1
    """With the distributed optimizer, cut the data x context parallel ranks into this many
    instances of consecutive ranks (--num-distributed-optimizer-instances): the optimizer
    state is sharded inside each instance and every instance holds a full copy; grads are
    reduce-scattered inside the instance, then each shard is all-reduced across instances.
    The groups come from ``initialize_model_parallel(num_distributed_optimizer_instances=N)``."""

    bucket_size: Optional[int] = None
    """Elements per gradient bucket (--ddp-bucket-size); used only with
    --overlap-grad-reduce, where None means max(40M, 1M x dp) elements. Without overlap
    there is one bucket per buffer."""

    pad_buckets_for_high_nccl_busbw: bool = False
    """With the distributed optimizer, pad each bucket to a multiple of lcm(dp, 128, 2**16)
    instead of lcm(dp, 128): NCCL reaches higher bus bandwidth on such sizes
    (--ddp-pad-buckets-for-high-nccl-busbw)."""

    average_in_collective: bool = False
    """Average inside the collective (ReduceOp.AVG, NCCL only) instead of scaling the
    grads by 1/dp before a summing all-reduce (--ddp-average-in-collective)."""

    fp8_param_gather: bool = False
    """Keep the FP8 linears' weights in buffers of their own and all-gather them as FP8
    bytes, quantized from the fp32 master shards (--fp8-param-gather); needs the distributed
    optimizer and a model with FP8 linears (docs/fp8.md)."""

    check_for_nan_in_grad: bool = False
    """Check each bucket's local grads for NaN/Inf before reducing them
    (--check-for-nan-in-loss-and-grad)."""

    def __post_init__(self) -> None:
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "--overlap-param-gather needs --use-distributed-optimizer (and --overlap-grad-reduce): "
                "add them or drop --overlap-param-gather"
            )
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ValueError(
                "--overlap-param-gather needs --overlap-grad-reduce: add --overlap-grad-reduce or drop "
                "--overlap-param-gather"
            )
        if self.fp8_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "--fp8-param-gather needs --use-distributed-optimizer: the FP8 weights are quantized from the "
                "distributed optimizer's master shards and all-gathered by it; add --use-distributed-optimizer "
                "or drop --fp8-param-gather"
            )
        instances = self.num_distributed_optimizer_instances
        if not isinstance(instances, int) or instances < 1:
            raise ValueError(f"--num-distributed-optimizer-instances must be a positive integer, got {instances!r}")
        if instances > 1 and not self.use_distributed_optimizer:
            raise ValueError(
                f"--num-distributed-optimizer-instances {instances} needs --use-distributed-optimizer: add it, "
                "or drop the flag (set it to 1)"
            )
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size must be a positive number of elements, got {self.bucket_size}")
