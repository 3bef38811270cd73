"""Model-parallel process groups, built once per run.

``initialize_model_parallel`` validates the layout, builds every group of the dense and
expert grids (see ``rank_grid``) and the distributed optimizer's instance groups
(``instance_groups``), and installs a default ``ProcessGroups``. The
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
_NUM_DIST_OPT_INSTANCES: int = 1


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


def _split_into_instances(groups: List[List[int]], num_instances: int):
    """(intra, inter) rank lists: each group cut into ``num_instances`` runs of consecutive
    members, and the members at the same position of every run."""
    intra, inter = [], []
    for ranks in groups:
        size = len(ranks) // num_instances
        intra += [ranks[j * size:(j + 1) * size] for j in range(num_instances)]
        inter += [ranks[i::size] for i in range(size)]
    return intra, inter


def check_instances(layout: ParallelLayout, num_instances: int) -> None:
    """Raise ValueError unless both data-parallel sizes split into ``num_instances`` instances."""
    flag = "--num-distributed-optimizer-instances"
    if not isinstance(num_instances, int) or num_instances < 1:
        raise ValueError(f"{flag} must be a positive integer, got {num_instances!r}")
    dp_cp = layout.dp * layout.dense.cp
    if dp_cp % num_instances:
        raise ValueError(
            f"{flag} {num_instances}: the data x context parallel size {dp_cp} is not divisible by it; "
            "use a divisor of DP x CP (each instance holds DP x CP / N ranks)"
        )
    if layout.expert_dp % num_instances:
        raise ValueError(
            f"{flag} {num_instances}: the expert data-parallel size {layout.expert_dp} is not divisible by "
            "it; use a divisor of world / (ETP x EP x PP) or change --expert-model-parallel-size"
        )


def instance_groups(layout: ParallelLayout, num_instances: int) -> Dict[str, List[List[int]]]:
    """The distributed optimizer's groups for ``num_instances`` > 1, keyed by ``ProcessGroups``
    field: ``intra_dp_cp`` (D/N consecutive members of each data x context parallel group,
    one instance, over which the optimizer state is sharded), ``inter_dist_opt`` (the ranks
    at the same position of every instance, over which the shards' grads are all-reduced),
    and ``intra_expt_dp`` / ``inter_expt_dist_opt``, the same cut of the expert
    data-parallel groups."""
    check_instances(layout, num_instances)
    intra, inter = _split_into_instances(layout.dense.groups("dp-cp"), num_instances)
    intra_expt, inter_expt = _split_into_instances(layout.expert.groups("dp"), num_instances)
    return {"intra_dp_cp": intra, "inter_dist_opt": inter,
            "intra_expt_dp": intra_expt, "inter_expt_dist_opt": inter_expt}


def _new_groups(ranks_lists: List[List[int]], rank: int, timeout: Optional[timedelta], made: Optional[dict] = None):
    """Create a group for each rank list (every rank must call this); return ours.

    ``made`` ({rank tuple: group}) reuses the groups already created for equal lists."""
    mine = None
    made = {} if made is None else made
    for ranks in ranks_lists:
        key = tuple(ranks)
        if key not in made:  # embd/pos_embd lists repeat when pp == 1
            made[key] = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            mine = made[key]
    return mine


def initialize_distributed_optimizer_instances(num_instances: int,
                                               distributed_timeout_minutes: Optional[float] = None) -> ProcessGroups:
    """Build the groups of ``num_instances`` distributed-optimizer instances on the installed
    layout and add them to the default ``ProcessGroups`` (every rank must call this with the
    same value). With 1 instance the intra groups are the whole data-parallel groups and
    there is no inter group. ``initialize_model_parallel`` calls it; a later call with the
    same value does nothing, and one with N > 1 after the default of 1 builds the groups
    (the training application does so before wrapping the model in DDP)."""
    global _NUM_DIST_OPT_INSTANCES
    if _LAYOUT is None or _GROUPS is None:
        raise RuntimeError("initialize_model_parallel must run before initialize_distributed_optimizer_instances")
    groups = _GROUPS
    if num_instances == _NUM_DIST_OPT_INSTANCES and groups.intra_dp_cp is not None:
        return groups
    if _NUM_DIST_OPT_INSTANCES > 1:
        raise ValueError(
            f"--num-distributed-optimizer-instances {num_instances}: the groups were built for "
            f"{_NUM_DIST_OPT_INSTANCES} instances; pass the same value everywhere"
        )
    check_instances(_LAYOUT, num_instances)
    if num_instances == 1:
        groups.intra_dp_cp, groups.intra_expt_dp = groups.dp_cp, groups.expt_dp
        groups.inter_dist_opt = groups.inter_expt_dist_opt = None
    else:
        timeout = None if distributed_timeout_minutes is None else timedelta(minutes=distributed_timeout_minutes)
        made: dict = {}
        for name, ranks_lists in instance_groups(_LAYOUT, num_instances).items():
            setattr(groups, name, _new_groups(ranks_lists, dist.get_rank(), timeout, made))
    _NUM_DIST_OPT_INSTANCES = num_instances
    return groups


def get_num_distributed_optimizer_instances() -> int:
    return _NUM_DIST_OPT_INSTANCES


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    order: str = DEFAULT_ORDER,
    distributed_timeout_minutes: Optional[float] = None,
    num_distributed_optimizer_instances: int = 1,
) -> ProcessGroups:
    """Build all groups of the layout and install them as the default ``ProcessGroups``.

    torch.distributed must be initialized; every rank must call this with the same sizes.
    ``num_distributed_optimizer_instances`` (--num-distributed-optimizer-instances) cuts
    the data-parallel groups into that many distributed-optimizer instances
    (``instance_groups``).
    """
    global _GROUPS, _LAYOUT, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK, _NUM_DIST_OPT_INSTANCES
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
    check_instances(layout, num_distributed_optimizer_instances)
    timeout = None if distributed_timeout_minutes is None else timedelta(minutes=distributed_timeout_minutes)
    groups = ProcessGroups()
    for name, ranks_lists in layout_groups(layout).items():
        setattr(groups, name, _new_groups(ranks_lists, rank, timeout))
    _GROUPS, _LAYOUT, _NUM_DIST_OPT_INSTANCES = groups, layout, 1
    initialize_distributed_optimizer_instances(num_distributed_optimizer_instances, distributed_timeout_minutes)
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
    global _GROUPS, _LAYOUT, _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK, _NUM_DIST_OPT_INSTANCES
    _GROUPS = _LAYOUT = _VIRTUAL_PP_SIZE = _VIRTUAL_PP_RANK = None
    _NUM_DIST_OPT_INSTANCES = 1
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


def get_data_parallel_group(with_context_parallel: bool = False, partial_data_parallel: bool = False):
    """``partial_data_parallel``: this rank's distributed-optimizer instance (needs
    ``with_context_parallel``, as in Megatron-Core)."""
    g = get_process_groups()
    if partial_data_parallel:
        if not with_context_parallel:
            raise ValueError("partial_data_parallel=True needs with_context_parallel=True")
        return g.intra_dp_cp if g.intra_dp_cp is not None else g.dp_cp
    return g.dp_cp if with_context_parallel else g.dp


def get_inter_distributed_optimizer_instance_group():
    """The ranks at this rank's position in every distributed-optimizer instance (None with one)."""
    return get_process_groups().inter_dist_opt


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


def get_expert_data_parallel_group(check_initialized: bool = True, partial_expert_data_parallel: bool = False):
    """``partial_expert_data_parallel``: this rank's distributed-optimizer instance of it."""
    g = get_process_groups()
    if partial_expert_data_parallel and g.intra_expt_dp is not None:
        return g.intra_expt_dp
    return g.expt_dp


def get_tensor_model_parallel_world_size() -> int:
    return _ranks.overridden("tensor_model_parallel_world_size", lambda: group_size(get_process_groups().tp))


def get_tensor_model_parallel_rank() -> int:
    return _ranks.overridden("tensor_model_parallel_rank", lambda: group_rank(get_process_groups().tp))


def get_pipeline_model_parallel_world_size() -> int:
    return _ranks.overridden("pipeline_model_parallel_world_size", lambda: group_size(get_process_groups().pp))


def get_pipeline_model_parallel_rank() -> int:
    return _ranks.overridden("pipeline_model_parallel_rank", lambda: group_rank(get_process_groups().pp))


def get_data_parallel_world_size(with_context_parallel: bool = False, partial_data_parallel: bool = False) -> int:
    return group_size(get_data_parallel_group(with_context_parallel, partial_data_parallel))


def get_data_parallel_rank(with_context_parallel: bool = False, partial_data_parallel: bool = False) -> int:
    return group_rank(get_data_parallel_group(with_context_parallel, partial_data_parallel))


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
