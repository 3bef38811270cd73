"""The ``ProcessGroups`` value: every communication group a rank takes part in.

Modules receive one of these at construction (or take the default installed by
``parallel_state.initialize_model_parallel`` once, then) and use only what they hold.
Fields are ``torch.distributed.ProcessGroup`` objects; each group contains this rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch.distributed as dist

_DEFAULT: Optional["ProcessGroups"] = None


def group_size(group) -> int:
    """Size of ``group``; 1 when torch.distributed is not initialized."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group``; 0 when torch.distributed is not initialized."""
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


@dataclass
class ProcessGroups:
    """Groups of one rank, named as in Megatron-Core's process-group collection.

    tp: tensor parallel; pp: pipeline; dp: data parallel; dp_cp: data x context parallel
    (gradient reduction); cp: context parallel; mp: model parallel (tp x pp);
    tp_cp, tp_dp, tp_dp_cp: products; embd: first and last pipeline stage (tied
    embeddings); pos_embd: first stage; ep: expert parallel; expt_tp: expert tensor
    parallel; expt_dp: expert data parallel; tp_ep: expert tp x ep; tp_ep_pp: expert
    tp x ep x pp. ``embd`` and ``pos_embd`` are None on ranks outside those groups.

    Distributed-optimizer instances (--num-distributed-optimizer-instances N):
    intra_dp_cp: this rank's instance, D/N consecutive ranks of dp_cp (the optimizer state
    is sharded over it); inter_dist_opt: the ranks at this rank's position in every
    instance (the grad shards are all-reduced over it); intra_expt_dp / inter_expt_dist_opt:
    the same cut of expt_dp. With one instance intra_* are dp_cp / expt_dp and inter_* None;
    all four are None until ``initialize_model_parallel`` sets them (users read None as
    one instance).
    """

    tp: object = None
    pp: object = None
    dp: object = None
    dp_cp: object = None
    cp: object = None
    mp: object = None
    tp_cp: object = None
    tp_dp: object = None
    tp_dp_cp: object = None
    embd: object = None
    pos_embd: object = None
    ep: object = None
    expt_tp: object = None
    expt_dp: object = None
    tp_ep: object = None
    tp_ep_pp: object = None
    intra_dp_cp: object = None
    intra_expt_dp: object = None
    inter_dist_opt: object = None
    inter_expt_dist_opt: object = None

    def size(self, name: str) -> int:
        """World size of the group called ``name`` (1 if it is absent)."""
        return group_size(getattr(self, name))

    def rank(self, name: str) -> int:
        """This rank's index in the group called ``name`` (0 if it is absent)."""
        return group_rank(getattr(self, name))

    def is_pipeline_first_stage(self) -> bool:
        return self.rank("pp") == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.rank("pp") == self.size("pp") - 1

    def names(self):
        return [f.name for f in fields(self)]


def set_default_process_groups(groups: Optional[ProcessGroups]) -> None:
    """Install (or clear, with None) the value that modules given none will take."""
    global _DEFAULT
    _DEFAULT = groups


def default_process_groups() -> ProcessGroups:
    """The installed default; a single-process value when none was installed.

    Without an initialized process group every size is 1, which is what a model built
    on one CPU process for debugging needs.
    """
    if _DEFAULT is not None:
        return _DEFAULT
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "no default ProcessGroups is installed but torch.distributed runs with "
            f"{dist.get_world_size()} ranks: call "
            "megatron.core.parallel_state.initialize_model_parallel(...) first, or pass "
            "pg_collection=ProcessGroups(...) to the module"
        )
    return ProcessGroups()


def resolve(groups: Optional[ProcessGroups]) -> ProcessGroups:
    """``groups`` if given, else the default; for use once, in a constructor."""
    return groups if groups is not None else default_process_groups()
