"""More of Megatron-Core's ``parallel_state`` accessors, over the groups ``parallel_state``
holds: source ranks (the group's first global rank, the one that broadcasts), pipeline
neighbours, the expert tensor/data-parallel sizes and ranks, and the ``set_*`` overrides
scripts use to fake a layout in single-process tests.

Re-exported by ``parallel_state`` (and so ``mpu``); import them from there.
"""

from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist

from megatron.core.process_groups import default_process_groups, group_rank, group_size

# Values set by set_*; consulted by parallel_state's getters before the groups.
OVERRIDES: dict = {}


def _global_ranks(group) -> List[int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return [0]
    return dist.get_process_group_ranks(group)


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of the first rank of this rank's tensor-parallel group."""
    return _global_ranks(default_process_groups().tp)[0]


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    groups = default_process_groups()
    return _global_ranks(groups.dp_cp if with_context_parallel else groups.dp)[0]


def get_model_parallel_src_rank() -> int:
    return _global_ranks(default_process_groups().mp)[0]


def get_pipeline_model_parallel_first_rank() -> int:
    """Global rank of the first stage of this rank's pipeline."""
    return _global_ranks(default_process_groups().pp)[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return _global_ranks(default_process_groups().pp)[-1]


def _pipeline_neighbour(step: int) -> int:
    pp = default_process_groups().pp
    ranks = _global_ranks(pp)
    return ranks[(group_rank(pp) + step) % len(ranks)]


def get_pipeline_model_parallel_next_rank() -> int:
    return _pipeline_neighbour(1)


def get_pipeline_model_parallel_prev_rank() -> int:
    return _pipeline_neighbour(-1)


def get_expert_tensor_parallel_world_size() -> int:
    return group_size(default_process_groups().expt_tp)


def get_expert_tensor_parallel_rank() -> int:
    return group_rank(default_process_groups().expt_tp)


def get_expert_data_parallel_world_size() -> int:
    return group_size(default_process_groups().expt_dp)


def get_expert_data_parallel_rank() -> int:
    return group_rank(default_process_groups().expt_dp)


def get_expert_tensor_and_model_parallel_world_size() -> int:
    return group_size(default_process_groups().tp_ep)


def get_expert_tensor_and_model_parallel_rank() -> int:
    return group_rank(default_process_groups().tp_ep)


def _setter(key: str):
    def set_value(value: Optional[int]) -> None:
        OVERRIDES[key] = value

    set_value.__name__ = f"set_{key}"
    set_value.__doc__ = f"Override what get_{key} returns (None: back to the groups'), as Megatron-Core's setter."
    return set_value


set_tensor_model_parallel_world_size = _setter("tensor_model_parallel_world_size")
set_tensor_model_parallel_rank = _setter("tensor_model_parallel_rank")
set_pipeline_model_parallel_world_size = _setter("pipeline_model_parallel_world_size")
set_pipeline_model_parallel_rank = _setter("pipeline_model_parallel_rank")
set_expert_model_parallel_world_size = _setter("expert_model_parallel_world_size")
set_expert_model_parallel_rank = _setter("expert_model_parallel_rank")


def overridden(key: str, value_from_groups):
    """The ``set_*`` override for ``key`` if one is set, else ``value_from_groups()``."""
    value = OVERRIDES.get(key)
    return value_from_groups() if value is None else value


__all__ = [name for name in dir() if name.startswith(("get_", "set_"))]
