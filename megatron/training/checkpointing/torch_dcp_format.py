"""``--ckpt-format torch_dcp``: the checkpoint of --use-torch-fsdp2 runs (and the content of
--ckpt-format fsdp_dtensor under --use-megatron-fsdp's FSDP2 strategy), a plain
torch.distributed.checkpoint directory (``.metadata`` + ``__<rank>_0.distcp``, no
``metadata.json``, as in Megatron-LM) plus our run state.

Tensors: the model's DTensors under ``model.<name>`` and the optimizer's per-param
state under ``optimizer.state.<name>.<exp_avg|exp_avg_sq|step>`` (torch's
``get_model_state_dict`` / ``get_optimizer_state_dict`` names). DCP stores each DTensor's
global shape and every rank's shard, so a checkpoint loads at any data-parallel size:
each rank reads the slices of its new shard. Tensor-parallel shards are plain per-rank
tensors under FSDP2, so with TP > 1 every key is nested under ``tp_rank_<r>`` and the
tensor-parallel size must match on load.

Non-tensor state never goes through DCP's pickled objects (loading those would unpickle
freely): rank 0 writes ``common.pt`` (the run state of ``run_state.common_state`` and the
optimizer's param groups) and every rank writes ``rng_rank_<r>.pt``; both load with the
weights-only unpickler.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron.core.distributed.torch_fully_sharded_data_parallel import is_fully_sharded
from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.fp8_state import Fp8LoadReport, finish_resizes, fit_flat_state, log_report
from megatron.training.checkpointing.fsdp_dtensor_format import holds_torch_dist_layout
from megatron.training.checkpointing.run_state import capture_rng, common_state
from megatron.training.checkpointing.torch_format import load_own_file

logger = logging.getLogger(__name__)

FORMAT = "torch_dcp"
COMMON_FILENAME = "common.pt"
DCP_METADATA = ".metadata"
TORCH_DIST_MARKER = "metadata.json"


def rng_filename(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


def is_torch_dcp_checkpoint(directory: str) -> bool:
    """A DCP directory without torch_dist's ``metadata.json`` marker and without its keys
    (``fsdp_dtensor_format``: an fsdp_dtensor checkpoint of FSDP2 is one of these)."""
    return (os.path.isfile(os.path.join(directory, DCP_METADATA))
            and not os.path.isfile(os.path.join(directory, TORCH_DIST_MARKER))
            and not holds_torch_dist_layout(directory))


def refuse_format_mismatch(directory: str, model, ckpt_format_name: str) -> None:
    """FSDP2 models load only torch_dcp checkpoints, and torch_dcp loads only into FSDP2."""
    fsdp = is_fully_sharded(model)
    dcp = is_torch_dcp_checkpoint(directory)  # may read the DCP metadata: once
    if dcp and not fsdp:
        shown = ckpt_format_name if ckpt_format_name in (FORMAT, "fsdp_dtensor") else FORMAT
        raise CheckpointError(
            f"{directory} is a {shown} checkpoint of sharded DTensors (written by FSDP2: "
            "--use-torch-fsdp2, or --use-megatron-fsdp with --data-parallel-sharding-strategy optim_grads_params); "
            "this run does not use FSDP2. Load it with FSDP2 (at any data-parallel size), or turn it into one "
            "torch.save file with python -m torch.distributed.checkpoint.format_utils dcp_to_torch <dir> <file>")
    if fsdp and not dcp:
        raise CheckpointError(
            f"{directory} is a {ckpt_format_name} checkpoint without FSDP2's sharded DTensors; FSDP2 runs "
            "(--use-torch-fsdp2, --use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params) load "
            "only theirs (torch_dcp, or fsdp_dtensor written by FSDP2). Convert its weights first: run once "
            "without FSDP2 with --load <this root> --ckpt-convert-format torch_dcp --ckpt-convert-save DIR, then "
            "--load DIR/torch_dcp (the FSDP2 run starts with a fresh optimizer, as with --no-load-optim)")


def _single_chunk(model) -> torch.nn.Module:
    if len(model) != 1:
        raise CheckpointError(f"--ckpt-format torch_dcp saves one model chunk per rank; got {len(model)}")
    return model[0].module


def _tp_key(groups: ProcessGroups) -> Optional[str]:
    return f"tp_rank_{groups.rank('tp'):02d}" if groups.size("tp") > 1 else None


def _states(model, optimizer, with_optim: bool) -> Tuple[dict, Optional[list]]:
    """(tensor state to save or fill, the optimizer's param groups)."""
    module = _single_chunk(model)
    state = {"model": get_model_state_dict(module)}
    groups = None
    if with_optim:
        optim = get_optimizer_state_dict(module, optimizer.optimizer)
        state["optimizer"] = {"state": optim["state"]}
        groups = optim["param_groups"]
    others = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"--ckpt-format torch_dcp stores tensors only; the model state has non-tensor "
                              f"entries {others[:5]}")
    return state, groups


def _nested(state: dict, groups: ProcessGroups) -> dict:
    key = _tp_key(groups)
    return {key: state} if key else state


class TorchDcpSave:
    """--ckpt-format torch_dcp: every rank writes its shards with DCP; rank 0 the run state."""

    def __init__(self, state: dict, common: Optional[dict], rng: Optional[dict]) -> None:
        self.state, self.common, self.rng = state, common, rng

    @classmethod
    def plan(cls, request) -> "TorchDcpSave":
        # Without FSDP2 (--ckpt-convert-format torch_dcp from a DDP run) the optimizer's
        # params are not the model's, so only the weights are written: an FSDP2 run then
        # starts from them with a fresh optimizer, as with --no-load-optim.
        save_optim = request.save_optim and is_fully_sharded(request.model)
        if request.save_optim and not save_optim and request.rank == 0:
            logger.warning("--ckpt-format torch_dcp from a run without --use-torch-fsdp2: saving the weights only "
                           "(no optimizer or scheduler state)")
        state, param_groups = _states(request.model, request.optimizer, save_optim)
        common = None
        if request.rank == 0:
            common = common_state(request.args, request.iteration, request.optimizer, request.scheduler,
                                  request.num_flops, save_optim, request.save_rng, None)
            if save_optim:
                common["optimizer"]["torch_param_groups"] = param_groups
        return cls(_nested(state, request.groups), common, capture_rng() if request.save_rng else None)

    def bytes_needed(self, group) -> Optional[int]:
        """Not estimated for this format: no room check before writing."""
        return None

    def write(self, staging: str, group, rank: int, mid_shard: Callable[[], None]) -> List[str]:
        """Write this rank's files (collective over ``group``); ``mid_shard`` runs part-way."""
        names = []
        for name, obj in ((rng_filename(rank), self.rng), (COMMON_FILENAME, self.common)):
            if obj is not None:
                _save_durably(obj, os.path.join(staging, name))
                names.append(name)
        mid_shard()
        writer = FileSystemWriter(staging, single_file_per_rank=True, sync_files=True)
        dcp.save(self.state, storage_writer=writer, process_group=group)
        names.extend(n for n in os.listdir(staging) if n.startswith(f"__{rank}_"))
        if rank == 0:
            names.append(DCP_METADATA)
        return names

    def commit_files(self, staging: str) -> List[str]:
        return []


def _save_durably(obj, path: str) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _flatten(state: dict, prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _problems(state: dict, directory: str) -> List[str]:
    """Keys this rank asks for that the checkpoint lacks or holds with another shape."""
    metadata = FileSystemReader(directory).read_metadata().state_dict_metadata
    problems = []
    for key, tensor in _flatten(state).items():
        entry = metadata.get(key)
        if entry is None:
            problems.append(f"{key} is not in the checkpoint")
        elif hasattr(entry, "size") and tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{key}: checkpoint shape {tuple(entry.size)}, this model {tuple(tensor.shape)}")
    return problems


def read_common(directory: str) -> dict:
    """The run state rank 0 wrote (args, iteration, scheduler, optimizer hyper-parameters)."""
    path = os.path.join(directory, COMMON_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {COMMON_FILENAME}: a torch_dcp checkpoint written by another "
                              "program (such as Megatron-LM) is not readable here")
    return load_own_file(path)


def load(directory: str, model, optimizer, groups: ProcessGroups, rank: int, load_optim: bool, load_rng: bool,
         gather_problems: Callable[[str], List[str]], group) -> Tuple[dict, Optional[dict]]:
    """Load model (and optimizer) state in place, resharded to this run's data-parallel
    size; returns (common run state, this rank's RNG state or None). Keys and shapes are
    checked on every rank before anything is read."""
    common = read_common(directory)
    load_optim = load_optim and common.get("optimizer_saved", True)
    state, _ = _states(model, optimizer, load_optim)
    fp8_report = Fp8LoadReport()
    tp_key = _tp_key(groups)
    saved_shapes = {key: tuple(entry.size) for key, entry in
                    FileSystemReader(directory).read_metadata().state_dict_metadata.items() if hasattr(entry, "size")}
    to_read, fp8_resizes = fit_flat_state(state["model"], f"{tp_key}.model." if tp_key else "model.", saved_shapes,
                                          fp8_report, "model.")
    nested = _nested({**state, "model": to_read}, groups)
    mine = _problems(nested, directory)
    problems = sorted({p for p in gather_problems("\n    ".join(mine)) if p})
    if problems:
        raise CheckpointError(
            f"{directory} does not fit this model; nothing was loaded:\n    " + "\n    ".join(problems)[:4000]
            + "\nCheck the model flags and --tensor-model-parallel-size against the saving run (torch_dcp "
            "reshards over data-parallel ranks only); load with --no-load-optim if only optimizer keys differ.")
    log_report(fp8_report, gather_problems)
    try:
        dcp.load(nested, storage_reader=FileSystemReader(directory), process_group=group)
    except CheckpointException as error:
        raise CheckpointError(f"reading {directory} failed: {error}") from error
    finish_resizes(fp8_resizes)
    module = _single_chunk(model)
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=True))
    if load_optim:
        optim = {"state": state["optimizer"]["state"],
                 "param_groups": common["optimizer"]["torch_param_groups"]}
        set_optimizer_state_dict(module, optimizer.optimizer, optim)
    rng_path = os.path.join(directory, rng_filename(rank))
    rng = load_own_file(rng_path) if load_rng and os.path.isfile(rng_path) else None
    common["optimizer_loaded"] = load_optim
    return common, rng
