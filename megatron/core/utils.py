"""``megatron.core.utils``: the Megatron-Core helpers scripts import from this path, as thin
adapters over where each lives here (nothing else belongs in this module)."""

from __future__ import annotations

import torch

from megatron.core import parallel_state
from megatron.core.process_groups import group_rank, group_size
from megatron.core.tensor_parallel.partition import divide
from megatron.core.transformer.transformer_config import init_method_normal, scaled_init_method_normal

__all__ = ["divide", "get_attr_wrapped_model", "get_model_config", "get_pg_rank", "get_pg_size",
           "get_tensor_model_parallel_group_if_none", "init_method_normal", "is_torch_min_version",
           "scaled_init_method_normal"]


def is_torch_min_version(version: str, check_equality: bool = True) -> bool:
    """Whether the installed torch is at least ``version`` (strictly newer with
    ``check_equality=False``)."""
    installed = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])
    return installed >= version if check_equality else installed > version


def get_pg_size(group=None) -> int:
    """Size of ``group``; 1 without torch.distributed or without a group (as Megatron-Core)."""
    return group_size(group)


def get_pg_rank(group=None) -> int:
    """This rank in ``group``; 0 without torch.distributed or without a group."""
    return group_rank(group)


def get_tensor_model_parallel_group_if_none(tp_group=None, is_expert: bool = False, check_initialized: bool = True):
    """``tp_group`` when given, else the (expert) tensor-parallel group of the default layout."""
    if tp_group is not None:
        return tp_group
    if check_initialized and not parallel_state.model_parallel_is_initialized():
        raise ValueError("no tp_group given and parallel_state.initialize_model_parallel() has not run: "
                         "pass tp_group or initialize model parallelism first")
    groups = parallel_state.get_process_groups()
    return groups.expt_tp if is_expert else groups.tp


def get_attr_wrapped_model(model, attr: str, allow_none: bool = True, return_model_obj: bool = False):
    """``attr`` of ``model`` or of the first module it wraps (``.module`` chain: DDP,
    Float16 wrappers) that has it; with ``return_model_obj`` that module instead."""
    if isinstance(model, list):
        raise ValueError("get_attr_wrapped_model: pass one model chunk, not the list of chunks")
    while not hasattr(model, attr) or (not allow_none and getattr(model, attr) is None):
        if not hasattr(model, "module"):
            raise ValueError(f"get_attr_wrapped_model: no module in the wrapper chain has {attr!r}")
        model = model.module
    return model if return_model_obj else getattr(model, attr)


def get_model_config(model):
    """The ``TransformerConfig`` of a (wrapped) model chunk."""
    return get_attr_wrapped_model(model, "config", allow_none=False)
