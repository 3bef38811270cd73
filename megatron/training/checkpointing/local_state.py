"""One rank's whole training state as one plain dict: what the node-local and in-memory
non-persistent checkpoints (--non-persistent-ckpt-type local / in_memory) hold.

Unlike the persistent formats, which store each tensor once under a global name and can
reshard, this is what the rank holds, as it holds it: its model chunks' state dicts (its
tensor/pipeline/expert shard), its optimizer's state dict (for the distributed optimizer,
its own data-parallel shard of the fp32 main params and moments; the loss scaler is inside),
the learning-rate scheduler, its random number generators, the FLOPs so far and the run's
args stamped with the counters (iteration, consumed samples: the data position). So it
restores only into the same parallel layout and world size, which ``layout`` records
(``parallel_layout``); the callers refuse any other with a warning and fall back to the
persistent checkpoint.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from megatron.training.checkpointing.run_state import (
    CHECKPOINT_VERSION,
    capture_rng,
    parallel_layout,
    restore_rng,
    saved_counters,
)

# A local state dict written by another version of this layout is not read.
LOCAL_STATE_VERSION = 1


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def build_local_state(args, iteration: int, model: List, optimizer, scheduler, num_flops: float) -> dict:
    """This rank's state at ``iteration``; ``args`` is the namespace stamped with the run's
    counters (``RunState.stamped_args``). Its tensors are the live ones (not copies):
    serialize it, or ``cpu_copy`` it, before training goes on. Not collective."""
    save_optim = optimizer is not None and not args.no_save_optim
    return {
        "local_state_version": LOCAL_STATE_VERSION,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "args": args,
        "layout": parallel_layout(args),
        "num_floating_point_operations_so_far": num_flops,
        "model": [_unwrap(chunk).state_dict() for chunk in model],
        "optimizer": optimizer.state_dict() if save_optim else None,
        "opt_param_scheduler": scheduler.state_dict() if save_optim and scheduler is not None else None,
        "rng_state": None if args.no_save_rng else capture_rng(),
    }


def cpu_copy(value: Any) -> Any:
    """A copy of ``value`` in host memory: every tensor cloned to the CPU (parameters
    become plain tensors), containers rebuilt, other leaves shared (they are not changed
    in place: numbers, strings, RNG tuples, the stamped args copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, cpu_copy(v)) for k, v in value.items())
    if isinstance(value, list):
        return [cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(cpu_copy(v) for v in value)
    return value


def model_problems(state: dict, model: List) -> List[str]:
    """What keeps ``state`` from loading into ``model`` exactly (missing, extra or
    differently shaped tensors); empty when it fits."""
    chunks = [_unwrap(chunk) for chunk in model]
    saved_chunks = state.get("model") or []
    if len(saved_chunks) != len(chunks):
        return [f"{len(saved_chunks)} model chunks saved, this run has {len(chunks)}"]
    problems = []
    for index, (chunk, saved) in enumerate(zip(chunks, saved_chunks)):
        mine = chunk.state_dict()
        problems += [f"chunk {index}: missing {k}" for k in mine if k not in saved]
        problems += [f"chunk {index}: not in this model: {k}" for k in saved if k not in mine]
        problems += [f"chunk {index}: {k}: saved {tuple(saved[k].shape)}, this model {tuple(v.shape)}"
                     for k, v in mine.items() if k in saved and isinstance(v, torch.Tensor)
                     and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape]
    return problems


def apply_local_state(state: dict, model: List, optimizer, scheduler, args, *, load_optim: bool,
                      load_rng: bool) -> Tuple[int, float, dict, Optional[str]]:
    """Load ``state`` (checked with ``model_problems``) into the live model, optimizer and
    scheduler and, with ``load_rng``, this rank's generators. Returns (iteration, FLOPs so
    far, sample counters, a note on what was not restored or None). Not collective."""
    for chunk, saved in zip([_unwrap(c) for c in model], state["model"]):
        chunk.load_state_dict(saved, strict=True)
    notes = []
    if load_optim and optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None:
        # The fp32 main params must start from the loaded weights, not the initial ones.
        optimizer.reload_model_params()
        notes.append("optimizer state not restored (--no-load-optim, or not saved)")
    if load_rng and state.get("rng_state") is not None:
        restore_rng(state["rng_state"])
    elif load_rng:
        notes.append("RNG state not restored (not saved)")
    iteration, counters = saved_counters(args, state, finetune=False)
    flops = float(state.get("num_floating_point_operations_so_far", 0.0))
    return iteration, flops, counters, "; ".join(notes) or None
