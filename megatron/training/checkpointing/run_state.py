"""The non-tensor state of a run that a checkpoint carries: counters, args, scheduler,
loss scaler, the parallel layout, and each rank's random number generators."""

from __future__ import annotations

import logging
import random
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.training.run_state import CHECKPOINTED_SAMPLE_COUNTERS

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0

_LAYOUT_ARGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "data_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "world_size",
    "use_distributed_optimizer",
)


def parallel_layout(args) -> dict:
    return {name: getattr(args, name, None) for name in _LAYOUT_ARGS}


def describe_layout(layout: dict) -> str:
    short = {"tensor_model_parallel_size": "TP", "pipeline_model_parallel_size": "PP",
             "virtual_pipeline_model_parallel_size": "VPP", "data_parallel_size": "DP",
             "context_parallel_size": "CP", "expert_model_parallel_size": "EP",
             "expert_tensor_parallel_size": "ETP", "world_size": "world",
             "use_distributed_optimizer": "dist-opt"}
    return ", ".join(f"{short[k]}={layout.get(k)}" for k in _LAYOUT_ARGS)


def capture_rng() -> dict:
    """This rank's generators, under Megatron's key names."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker_states = state.get("rng_tracker_states")
    if tracker_states:
        get_cuda_rng_tracker().set_states(tracker_states)


def grad_scaler_state(optimizer) -> Optional[dict]:
    scaler = getattr(optimizer, "grad_scaler", None)
    return scaler.state_dict() if scaler is not None else None


def restore_grad_scaler(optimizer, state: Optional[dict]) -> None:
    scaler = getattr(optimizer, "grad_scaler", None)
    if scaler is not None and state:
        scaler.load_state_dict(state)


def common_state(args, iteration: int, optimizer, scheduler, num_flops: float, save_optim: bool,
                 save_rng: bool, optimizer_scalars: Optional[dict]) -> dict:
    """What rank 0 stores once for the whole checkpoint."""
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "args": args,
        "layout": parallel_layout(args),
        "num_floating_point_operations_so_far": num_flops,
        "rng_saved": save_rng,
        "optimizer_saved": save_optim,
    }
    if save_optim:
        state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
        state["optimizer"] = {
            "param_groups": [{k: v for k, v in group.items() if k != "params"}
                             for group in optimizer.optimizer.param_groups],
            "scalars": optimizer_scalars,
            "grad_scaler": grad_scaler_state(optimizer),
        }
    return state


def saved_counters(args, state: dict, finetune: bool) -> Tuple[int, Dict[str, int]]:
    """The iteration and the sample counters (``CHECKPOINTED_SAMPLE_COUNTERS``) to resume
    from, as the checkpoint's saved args hold them; (0, {}) when fine-tuning."""
    if finetune:
        return 0, {}
    saved_args = state.get("args")
    counters = {name: getattr(saved_args, name, 0) if saved_args is not None else 0
                for name in CHECKPOINTED_SAMPLE_COUNTERS}
    iteration = int(state.get("iteration", 0))
    override = getattr(args, "override_ckpt_iteration", None)
    if override is not None:
        iteration = override
        counters["consumed_train_samples"] = override * args.global_batch_size
    return iteration, counters


def restore_param_group_hyperparameters(optimizer, saved_groups) -> None:
    """Learning rate and weight decay of each group (the scheduler sets them again on its
    next step; restoring keeps a resumed step bit-identical)."""
    if not saved_groups:
        return
    groups = optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        logger.warning("the checkpoint has %d optimizer param groups, this run %d: keeping this run's "
                       "hyper-parameters", len(saved_groups), len(groups))
        return
    for group, saved in zip(groups, saved_groups):
        for key in ("lr", "weight_decay"):
            if key in saved:
                group[key] = saved[key]
