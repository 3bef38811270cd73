"""``--ckpt-format torch``: Megatron's legacy layout, one ``torch.save`` file per
model-parallel rank: ``mp_rank_<tp:02d>[_<pp:03d>][_<ep:03d>]/model_optim_rng.pt`` (the PP
suffix when the saving run had PP > 1, the EP suffix when EP > 1), written by the first
data-parallel rank of each model-parallel coordinate, plus ``distrib_optim.pt`` with the
data-parallel-gathered state of the distributed optimizer.

It loads only into the same tensor/pipeline/expert layout (the data-parallel size may
change); ``tools/checkpoint/convert.py`` or a save in torch_dist reshards it.
"""

from __future__ import annotations

import io
import os
from typing import Callable, List, Optional, Tuple

import torch

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.process_groups import ProcessGroups
from megatron.core.safe_unpickle import load_weights_only
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.fp8_state import Fp8LoadReport, fit_state_dict, log_report
from megatron.training.checkpointing.run_state import (
    CHECKPOINT_VERSION,
    capture_rng,
    describe_layout,
    parallel_layout,
)

FORMAT = "torch"
MODEL_FILENAME = "model_optim_rng.pt"
DIST_OPTIM_FILENAME = "distrib_optim.pt"
_EXTRA_STATE_SUFFIX = "_extra_state"


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp_size: int, ep_size: int) -> str:
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def is_torch_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(n.startswith("mp_rank_") for n in os.listdir(directory))


def _my_dir_name(groups: ProcessGroups) -> str:
    return rank_dir_name(groups.rank("tp"), groups.rank("pp"), groups.rank("ep"), groups.size("pp"),
                         groups.size("ep"))


def is_writer(groups: ProcessGroups) -> bool:
    """The first data-parallel replica of each (tp, pp, ep) coordinate writes."""
    if groups.size("ep") > 1:
        return groups.rank("expt_dp") == 0 and groups.rank("cp") == 0
    return groups.rank("dp_cp") == 0


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_states(model) -> dict:
    chunks = [_unwrap(c) for c in model]
    if len(chunks) == 1:
        return {"model": chunks[0].state_dict()}
    return {f"model{i}": chunk.state_dict() for i, chunk in enumerate(chunks)}


def build_payload(args, iteration: int, model, optimizer, scheduler, num_flops: float, save_optim: bool,
                  save_rng: bool, groups: ProcessGroups):
    """(subdirectory, state dict, distributed-optimizer state) for a writer, None for the
    others. Collective over the data-parallel groups with the distributed optimizer."""
    distributed = isinstance(optimizer, DistributedOptimizer)
    dp_zero = optimizer.get_parameter_state_dp_zero() if save_optim and distributed else None
    if not is_writer(groups):
        return None
    state = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": num_flops,
        "layout": parallel_layout(args),
    }
    state.update(_model_states(model))
    if save_optim:
        if distributed:
            full = optimizer.state_dict()
            state["optimizer"] = {"param_groups": full["param_groups"], "grad_scaler": full.get("grad_scaler"),
                                  "distributed": True}
        else:
            state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    if save_rng:
        state["rng_state"] = [capture_rng()]
    return _my_dir_name(groups), state, dp_zero


def _write_bytes(path: str, data: bytes, crash: Callable[[], None]) -> None:
    with open(path, "wb") as handle:
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        crash()
        handle.write(data[half:])
        handle.flush()
        os.fsync(handle.fileno())


def write(payload, directory: str, crash_mid_shard: Callable[[], None]) -> List[str]:
    if payload is None:
        return []
    subdir, state, dp_zero = payload
    os.makedirs(os.path.join(directory, subdir), exist_ok=True)
    written = []
    for filename, obj in ((MODEL_FILENAME, state), (DIST_OPTIM_FILENAME, dp_zero)):
        if obj is None:
            continue
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        _write_bytes(os.path.join(directory, subdir, filename), buffer.getvalue(), crash_mid_shard)
        written.append(f"{subdir}/{filename}")
    return written


def _saved_layout_problem(directory: str, manifest: Optional[dict], groups: ProcessGroups, args) -> Optional[str]:
    path = os.path.join(directory, _my_dir_name(groups), MODEL_FILENAME)
    if os.path.isfile(path):
        saved = (manifest or {}).get("layout")
        if saved is None:
            return None
        same = all(saved.get(k) == getattr(args, k, None) for k in
                   ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
        if same:
            return None
    saved_text = describe_layout(manifest["layout"]) if manifest and manifest.get("layout") else \
        "unknown (" + ", ".join(sorted(n for n in os.listdir(directory) if n.startswith("mp_rank_"))) + ")"
    return (f"{directory} is a --ckpt-format torch checkpoint saved with layout {saved_text}; this run has "
            f"{describe_layout(parallel_layout(args))}. The torch format loads only into the same tensor, "
            "pipeline and expert parallel sizes: reshard it with tools/checkpoint/convert.py "
            "(--target-tensor-parallel-size / --target-pipeline-parallel-size) or save it in torch_dist.")


def _model_problems(model, state: dict, fp8_report: Fp8LoadReport, coordinate: str) -> List[str]:
    chunks = [_unwrap(c) for c in model]
    problems = []
    for index, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{index}"
        if key not in state:
            problems.append(f"no {key!r} entry in the checkpoint file")
            continue
        mine = chunk.state_dict()
        fit_state_dict(state[key], mine, fp8_report, f"{coordinate}/{key}/")
        saved = {k: v for k, v in state[key].items() if not k.endswith(_EXTRA_STATE_SUFFIX)}
        state[key] = saved
        problems += [f"missing from the checkpoint: {k} {tuple(v.shape)}" for k, v in mine.items() if k not in saved]
        problems += [f"in the checkpoint but not in this model: {k}" for k in saved if k not in mine]
        problems += [f"{k}: checkpoint {tuple(saved[k].shape)}, this model {tuple(v.shape)}"
                     for k, v in mine.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    return problems


def load_own_file(path: str):
    """``torch.load`` of a file this format wrote, with torch's weights-only unpickler: tensors,
    plain containers, the saved ``argparse.Namespace`` and NumPy arrays, nothing that runs code."""
    return load_weights_only(path)


def read_state(directory: str, manifest: Optional[dict], groups: ProcessGroups, args,
               gather_problems: Callable[[str], List[str]]) -> Tuple[dict, str]:
    problem = _saved_layout_problem(directory, manifest, groups, args)
    problems = gather_problems(problem or "")
    if any(problems):
        raise CheckpointError(next(p for p in problems if p))
    subdir = os.path.join(directory, _my_dir_name(groups))
    state = load_own_file(os.path.join(subdir, MODEL_FILENAME))
    return state, subdir


def load(directory: str, manifest: Optional[dict], model, optimizer, groups: ProcessGroups, args,
         load_optim: bool, gather_problems: Callable[[str], List[str]]) -> Tuple[dict, Optional[dict]]:
    """Load the model (and optimizer) in place; returns (the file's state, its RNG state or None)."""
    state, subdir = read_state(directory, manifest, groups, args, gather_problems)
    fp8_report = Fp8LoadReport()
    # tensor-parallel replicas of a linear share its name; pipeline and expert ranks do not
    coordinate = f"pp{groups.rank('pp')}_ep{groups.rank('ep')}"
    problems = gather_problems("\n".join(_model_problems(model, state, fp8_report, coordinate)))
    if any(problems):
        details = "\n".join(sorted(set(p for p in problems if p)))
        raise CheckpointError(f"{directory} does not fit this model; nothing was loaded.\n{details}")
    distributed = isinstance(optimizer, DistributedOptimizer)
    saved_opt = state.get("optimizer") if load_optim else None
    if saved_opt is not None and bool(saved_opt.get("distributed")) != distributed:
        problems = gather_problems("the checkpoint's optimizer was saved "
                                   f"{'with' if saved_opt.get('distributed') else 'without'} "
                                   "--use-distributed-optimizer; load with --no-load-optim or save in torch_dist")
        raise CheckpointError(problems[0])
    log_report(fp8_report, gather_problems)
    chunks = [_unwrap(c) for c in model]
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{index}"], strict=True)
    if saved_opt is not None:
        if distributed:
            dp_zero = load_own_file(os.path.join(subdir, DIST_OPTIM_FILENAME))
            optimizer.load_parameter_state_from_dp_zero(dp_zero)
            if saved_opt.get("grad_scaler") and optimizer.grad_scaler is not None:
                optimizer.grad_scaler.load_state_dict(saved_opt["grad_scaler"])
            for group, saved in zip(optimizer.optimizer.param_groups, saved_opt["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
        else:
            optimizer.load_state_dict(saved_opt)
    rng = (state.get("rng_state") or [None])[0]
    return state, rng
