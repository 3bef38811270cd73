"""Data parallelism: contiguous grad buffers, their reduction, and finalize_model_grads;
FSDP2 (``TorchFullyShardedDataParallel``)."""

from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.distributed.param_and_grad_buffer import ParamAndGradBucket, ParamAndGradBuffer
from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "finalize_model_grads",
    "ParamAndGradBucket",
    "ParamAndGradBuffer",
    "TorchFullyShardedDataParallel",
]
