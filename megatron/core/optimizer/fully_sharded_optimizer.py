"""The optimizer of FSDP2 models: fp32 DTensor params, each rank stepping its own shard.

Under ``TorchFullyShardedDataParallel`` the params are the fp32 main params already
(sharded over the data x context parallel ranks) and their grads are fp32 shards, so the
torch optimizer steps them directly, as ``FP32Optimizer`` does. What differs is the grad
statistics: each rank holds only its shard of every grad, so the norm sums the squares of
the local shards over the data x context parallel group and then, as everywhere, over the
model-parallel group (tp duplicates counted on tp rank 0, as ``clip_grads`` describes).
The result equals the norm of the unsharded grads that DDP would compute.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from megatron.core import process_groups
from megatron.core.optimizer.clip_grads import count_zeros_fp32, get_grads_for_norm, get_grad_norm_fp32
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.process_groups import ProcessGroups


class _LocalGrad:
    """A stand-in param whose ``.grad`` is a DTensor grad's local shard, carrying the
    attributes the grad statistics filter on."""

    __slots__ = ("grad", "tensor_model_parallel", "shared")

    def __init__(self, param: torch.Tensor) -> None:
        self.grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
        self.tensor_model_parallel = getattr(param, "tensor_model_parallel", False)
        self.shared = getattr(param, "shared", False)


class FullyShardedOptimizer(FP32Optimizer):
    """``FP32Optimizer`` over DTensor params whose grads are sharded over dp x cp."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        init_state_fn: Optional[Callable] = None,
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        super().__init__(optimizer, config, init_state_fn, pg_collection)
        pgs = process_groups.resolve(pg_collection)
        # Shards over dp x cp first, then the model-parallel sum (as the distributed optimizer).
        self.grad_stats_parallel_group = (pgs.dp_cp, pgs.mp)

    @property
    def can_step_on_device(self) -> bool:
        return False  # the clipping scales DTensor shards (``clip_grad_norm`` below) on the host path only

    def _local_grads(self) -> List[_LocalGrad]:
        return [_LocalGrad(p) for p in self.get_parameters() if p.grad is not None]

    def get_main_grads_for_grad_norm(self) -> List[torch.Tensor]:
        return get_grads_for_norm(self._local_grads(), self.tp_group)

    def clip_grad_norm(self, clip_grad: float) -> float:
        """Global grad norm (before clipping); the local shards are scaled when it is larger."""
        grad_norm = get_grad_norm_fp32(self.get_main_grads_for_grad_norm(), 2, self.grad_stats_parallel_group)
        clip_coeff = float(clip_grad) / (grad_norm + 1.0e-6)
        grads = [g.grad for g in self._local_grads()]
        if grads and clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)
        return grad_norm

    def count_zeros(self) -> int:
        return int(count_zeros_fp32(self._local_grads(), self.grad_stats_parallel_group, self.tp_group))
