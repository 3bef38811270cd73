"""Model-parallel process groups, built once per run.

``initialize_model_parallel`` validates the layout, builds every group of the dense and
expert grids (see ``rank_grid``) and installs a default ``ProcessGroups``. The
``get_*`` accessors exist for Megatron users' scripts; library modules never call them
deep inside layers (they hold the ``ProcessGroups`` they were built with).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron.core.process_groups import (
    ProcessGroups,
    default_process_groups,
    group_rank,
    group_size,
    set_default_process_groups,
)
from megatron.core.rank_grid import (
    DEFAULT_ORDER,
    RankGrid,
    embedding_ranks,
    parse_order,
    position_embedding_ranks,
)

logger = logging.getLogger(__name__)

_GROUPS: Optional[ProcessGroups] = None
_LAYOUT: Optional["ParallelLayout"] = None
_VIRTUAL_PP_SIZE: Optional[int] = None
_VIRTUAL_PP_RANK: Optional[int] = None


@dataclass(frozen=True)
class ParallelLayout:
    """A validated parallel layout for ``world_size`` ranks.

    ``dense`` is the grid for attention and dense layers (ep = 1); ``expert`` the grid
    for MoE layers (tp = expert tensor parallel size, cp = 1).
    """

    world_size: int
    dense: RankGrid
    expert: RankGrid

    @property
    def dp(self) -> int:
        return self.dense.dp

    @property
    def expert_dp(self) -> int:
        return self.expert.dp


def build_layout(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    order: str = DEFAULT_ORDER,
) -> ParallelLayout:
    """Validate the sizes against ``world_size`` and derive the data-parallel sizes.

    Raises ValueError naming the flag and the rule on any impossible layout.
    """
    tp, pp, cp, ep = (
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        expert_model_parallel_size,
    )
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    flags = {
        "--tensor-model-parallel-size": tp,
        "--pipeline-model-parallel-size": pp,
        "--context-parallel-size": cp,
        "--expert-model-parallel-size": ep,
        "--expert-tensor-parallel-size": etp,
    }
    for flag, value in flags.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    names = parse_order(order)
    model = tp * pp * cp
    if world_size % model:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x "
            f"context ({cp}) parallel size = {model}: change --tensor-model-parallel-size, "
            "--pipeline-model-parallel-size or --context-parallel-size, or the number of ranks"
        )
    dp = world_size // model
    expert_model = etp * ep * pp
    if world_size % expert_model:
        raise ValueError(
            f"world size {world_size} is not divisible by expert tensor ({etp}) x expert "
            f"({ep}) x pipeline ({pp}) parallel size = {expert_model}: change "
            "--expert-tensor-parallel-size or --expert-model-parallel-size"
        )
    expert_dp = world_size // expert_model
    if names[-1] != "pp" and pp > 1 and expert_dp != dp:
        raise ValueError(
            f"with order {order!r} (not ending in pp) and pipeline parallel size {pp}, the "
            f"expert data-parallel size ({expert_dp}) must equal the data-parallel size ({dp})"
        )
    dense = RankGrid(tp=tp, cp=cp, ep=1, dp=dp, pp=pp, order=order)
    expert = RankGrid(tp=etp, cp=1, ep=ep, dp=expert_dp, pp=pp, order=order)
    if dense.groups("pp") != expert.groups("pp"):
        raise ValueError(
            "the pipeline groups of the dense and expert grids differ for this layout "
            f"(tp={tp}, cp={cp}, ep={ep}, etp={etp}, pp={pp}, order={order!r}); "
            "choose sizes such that tp*cp*dp == etp*ep*expert_dp"
        )
    return ParallelLayout(world_size=world_size, dense=dense, expert=expert)


def layout_groups(layout: ParallelLayout) -> Dict[str, List[List[int]]]:
    """Every group of the layout as lists of ranks, keyed by ``ProcessGroups`` field."""
    d, e = layout.dense, layout.expert
    pp_groups = d.groups("pp")
    return {
        "dp_cp": d.groups("dp-cp"),
        "dp": d.groups("dp"),
        "cp": d.groups("cp"),
        "mp": d.groups("tp-pp"),
        "tp": d.groups("tp"),
        "pp": pp_groups,
        "tp_cp": d.groups("tp-cp"),
        "tp_dp": d.groups("tp-dp"),
        "tp_dp_cp": d.groups("tp-dp-cp"),
        "embd": [embedding_ranks(g) for g in pp_groups],
        "pos_embd": [position_embedding_ranks(g) for g in pp_groups],
        "ep": e.groups("ep"),
        "expt_tp": e.groups("tp"),
        "expt_dp": e.groups("dp"),
        "tp_ep": e.groups("tp-ep"),
        "tp_ep_pp": e.groups("tp-ep-pp"),
    }


def _new_groups(ranks_lists: List[List[int]], rank: int, timeout: Optional[timedelta]):
    """Create a group for each rank list (every rank must call this); return ours."""
    mine = None
    seen = set()
    for ranks in ranks_lists:
        key = tuple(ranks)
        if key in seen:  # embd/pos_embd lists repeat when pp == 1
            continue
        seen.add(key)
        group = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    order: str = DEFAULT_ORDER,
    distributed_timeout_minutes: Optional[float] = None,
) -> ProcessGroups:
    """Build all groups of the layout and install them as the default ``ProcessGroups``.

    torch.distributed must be initialized; every rank must call this with the same sizes.
    """
    global _GROUPS, _LAYOUT, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(or megatron.training.initialize_megatron) before initialize_model_parallel"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = build_layout(
        world,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        expert_model_parallel_size,
        expert_tensor_parallel_size,
        order,
    )
    timeout = None if distributed_timeout_minutes is None else timedelta(minutes=distributed_timeout_minutes)
    groups = ProcessGroups()
    for name, ranks_lists in layout_groups(layout).items():
        setattr(groups, name, _new_groups(ranks_lists, rank, timeout))
    _GROUPS, _LAYOUT = groups, layout
    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK = virtual_pipeline_model_parallel_size, 0
    set_default_process_groups(groups)
    logger.info(
        "parallel layout: world %d = tp %d x cp %d x dp %d x pp %d (ep %d, etp %d), order %s",
        world, layout.dense.tp, layout.dense.cp, layout.dp, layout.dense.pp,
        layout.expert.ep, layout.expert.tp, order,
    )
    return groups


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Forget the groups and the default (the groups themselves die with the world)."""
    global _GROUPS, _LAYOUT, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK
    _GROUPS = _LAYOUT = _VIRTUAL_PP_SIZE = _VIRTUAL_PP_RANK = None
    _ranks.OVERRIDES.clear()
    set_default_process_groups(None)


def get_process_groups() -> ProcessGroups:
    return default_process_groups()


def get_layout() -> Optional[ParallelLayout]:
    return _LAYOUT


# Megatron-compatible accessors, for user scripts and the training application.
def get_tensor_model_parallel_group():
    return get_process_groups().tp


def get_pipeline_model_parallel_group():
    return get_process_groups().pp


def get_data_parallel_group(with_context_parallel: bool = False):
    g = get_process_groups()
    return g.dp_cp if with_context_parallel else g.dp


def get_context_parallel_group():
    return get_process_groups().cp


def get_model_parallel_group():
    return get_process_groups().mp


def get_embedding_group():
    return get_process_groups().embd


def get_position_embedding_group():
    return get_process_groups().pos_embd


def get_expert_model_parallel_group():
    return get_process_groups().ep


def get_expert_tensor_parallel_group():
    return get_process_groups().expt_tp


def get_expert_data_parallel_group():
    return get_process_groups().expt_dp


def get_tensor_model_parallel_world_size() -> int:
    return _ranks.overridden("tensor_model_parallel_world_size", lambda: group_size(get_process_groups().tp))


def get_tensor_model_parallel_rank() -> int:
    return _ranks.overridden("tensor_model_parallel_rank", lambda: group_rank(get_process_groups().tp))


def get_pipeline_model_parallel_world_size() -> int:
    return _ranks.overridden("pipeline_model_parallel_world_size", lambda: group_size(get_process_groups().pp))


def get_pipeline_model_parallel_rank() -> int:
    return _ranks.overridden("pipeline_model_parallel_rank", lambda: group_rank(get_process_groups().pp))


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return group_size(get_data_parallel_group(with_context_parallel))


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return group_rank(get_data_parallel_group(with_context_parallel))


def get_context_parallel_world_size() -> int:
    return group_size(get_process_groups().cp)


def get_context_parallel_rank() -> int:
    return group_rank(get_process_groups().cp)


def get_expert_model_parallel_world_size() -> int:
    return _ranks.overridden("expert_model_parallel_world_size", lambda: group_size(get_process_groups().ep))


def get_expert_model_parallel_rank() -> int:
    return _ranks.overridden("expert_model_parallel_rank", lambda: group_rank(get_process_groups().ep))


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PP_SIZE


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PP_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    global _VIRTUAL_PP_RANK
    _VIRTUAL_PP_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = True) -> bool:
    if not ignore_virtual and _VIRTUAL_PP_SIZE is not None and _VIRTUAL_PP_RANK != 0:
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = True) -> bool:
    if not ignore_virtual and _VIRTUAL_PP_SIZE is not None and _VIRTUAL_PP_RANK != _VIRTUAL_PP_SIZE - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def set_virtual_pipeline_model_parallel_world_size(size: Optional[int]) -> None:
    global _VIRTUAL_PP_SIZE
    _VIRTUAL_PP_SIZE = size


# Megatron-Core's further accessors and RankGenerator live in their own files; re-exported
# here so scripts find them under parallel_state (and mpu).
from megatron.core import parallel_state_ranks as _ranks  # noqa: E402
from megatron.core.parallel_state_ranks import *  # noqa: E402,F401,F403
from megatron.core.rank_generator import RankGenerator  # noqa: E402,F401
