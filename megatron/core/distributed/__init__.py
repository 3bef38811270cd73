"""Data parallelism: contiguous grad buffers, their reduction, and finalize_model_grads."""

from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.distributed.param_and_grad_buffer import ParamAndGradBucket, ParamAndGradBuffer

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "finalize_model_grads",
    "ParamAndGradBucket",
    "ParamAndGradBuffer",
]
