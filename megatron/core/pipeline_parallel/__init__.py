"""Pipeline parallelism: schedules over micro-batches and stage-to-stage messages."""

from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

__all__ = ["get_forward_backward_func"]
