"""``--ckpt-format torch_dist``: one shared directory, every rank writes its own chunks
(torch.distributed.checkpoint files ``__<rank>_0.distcp`` + ``.metadata``), keys and global
shapes independent of the parallel layout, so any layout loads it.

Keys: the model's tensors under their global names (``model_sharding``); optimizer
state in model space, ``optimizer.state.<name>.<model key>`` for ``fp32_param`` and the
per-element states; ``common_state`` (rank 0's run state); ``rng_state/rank_<r>``.
``metadata.json`` (Megatron's marker of a distributed checkpoint) is written last.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Tuple

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron.core.dist_checkpointing import (
    ShardedObject,
    ShardedTensor,
    compare_with_checkpoint,
    load_sharded,
    read_metadata,
    save_sharded,
)
from megatron.core.dist_checkpointing.model_sharding import model_placements
from megatron.core.optimizer.param_state import (
    empty_model_space_state,
    install_main_params,
    load_model_space_state,
    model_space_state,
)
from megatron.core.process_groups import ProcessGroups
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.fp8_state import (
    Fp8LoadReport,
    drop_unused,
    finish_resizes,
    fit_sharded_requests,
    log_report,
)
from megatron.training.checkpointing.model_match import differing_flags, vocabulary_problem
from megatron.training.rank_print import print_rank_0

FORMAT = "torch_dist"
MARKER_FILENAME = "metadata.json"
MARKER = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_KEY = "common_state"
OPTIMIZER_PREFIX = "optimizer.state."


def rng_key(rank: int) -> str:
    return f"rng_state/rank_{rank}"


def is_torch_dist_checkpoint(directory: str) -> bool:
    path = os.path.join(directory, MARKER_FILENAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as handle:
            return json.load(handle).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError):
        return False


def _optimizer_chunks(placements, states) -> List[ShardedTensor]:
    placement_of = {id(tensor): placement for tensor, placement in placements}
    chunks = []
    for param, entry in states.items():
        placement = placement_of[id(param)]
        for name, value in entry.items():
            chunks.extend(placement.shard(value, f"{OPTIMIZER_PREFIX}{name}.{placement.key}"))
    return chunks


def gather_optimizer_state(optimizer, save_optim: bool):
    """(per-param state, scalars); collective for the distributed optimizer."""
    if not save_optim:
        return {}, None
    return model_space_state(optimizer)


def build_save_items(model, groups: ProcessGroups, rank: int, optimizer_states, common: Optional[dict],
                     rng: Optional[dict], to_cpu: bool) -> Tuple[List[ShardedTensor], List[ShardedObject]]:
    placements = model_placements(model, groups)
    chunks = [chunk for tensor, placement in placements for chunk in placement.shard(tensor.detach())]
    chunks.extend(_optimizer_chunks(placements, optimizer_states))
    if to_cpu:
        # Background writes need a snapshot: training goes on changing the live tensors.
        for chunk in chunks:
            chunk.data = chunk.data.detach().to("cpu", copy=True)
    objects = []
    if common is not None:
        objects.append(ShardedObject(COMMON_KEY, common))
    if rng is not None:
        objects.append(ShardedObject(rng_key(rank), rng))
    return chunks, objects


def write(items, directory: str, group, before_write: Optional[Callable[[int], None]], rank: int) -> List[str]:
    """Write this rank's items; returns the names of the files this rank wrote."""
    tensors, objects = items
    save_sharded(tensors, objects, directory, group=group, before_write=before_write)
    names = [n for n in os.listdir(directory) if n.startswith(f"__{rank}_")]
    if rank == 0:
        names.append(".metadata")
    return names


def write_marker(directory: str) -> str:
    with open(os.path.join(directory, MARKER_FILENAME), "w") as handle:
        json.dump(MARKER, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return MARKER_FILENAME


def read_common(directory: str, group) -> dict:
    common = ShardedObject(COMMON_KEY)
    try:
        load_sharded([], [common], directory, group=group)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 -- re-raised with the path
        raise CheckpointError(f"{directory}: cannot read the checkpoint's common state ({error})") from error
    return common.value


def _unexpected_model_keys(tensors, metadata, gather: Callable) -> List[str]:
    """Model tensors in the checkpoint that no rank asked for (a bias, a norm's bias, a
    layer this model lacks). Each rank asks for its own stage's keys only, so the
    requested keys are gathered from all ranks first."""
    requested = set()
    for keys in gather(sorted({t.key for t in tensors})):
        requested.update(keys)
    return sorted(f"{key} {tuple(entry.size)}" for key, entry in metadata.state_dict_metadata.items()
                  if not key.startswith(OPTIMIZER_PREFIX) and hasattr(entry, "size") and key not in requested
                  and not isinstance(entry, BytesStorageMetadata))


# --dist-ckpt-strictness (Megatron's values). Megatron calls a tensor this model asks for
# that the checkpoint lacks "unexpected", and one the checkpoint holds that nobody asks for
# "missing". The strict modes refuse both (stricter than Megatron's assume_ok_unexpected and
# raise_unexpected, which pass over the second kind); every other mode loads what fits,
# leaves the absent tensors at their current values and prints both lists: log_* as
# Megatron does, return_* and ignore_all too (Megatron hands those lists to a caller that
# drops them, or says nothing), since a load that does not fit is never silent here.
STRICT_DEFAULT = "assume_ok_unexpected"
STRICT_MODES = ("assume_ok_unexpected", "raise_unexpected", "raise_all")


def _drop_absent_if_allowed(tensors, metadata, strictness: str, load_optim: bool, gather: Callable):
    """(the requests to read, a problem or None): under a non-strict --dist-ckpt-strictness
    the model tensors the checkpoint lacks are left out (and listed); their optimizer state
    could not be restored, so an optimizer load is then refused."""
    if strictness in STRICT_MODES:
        return tensors, None
    saved = metadata.state_dict_metadata
    absent = sorted({t.key for t in tensors if saved.get(t.key) is None or isinstance(saved[t.key], BytesStorageMetadata)})
    everyone = sorted({key for keys in gather(absent) for key in keys})
    if not everyone:
        return tensors, None
    model_keys = [key for key in everyone if not key.startswith(OPTIMIZER_PREFIX)]
    if load_optim:
        return tensors, (f"--dist-ckpt-strictness {strictness}: {len(model_keys)} tensor(s) of this model are not in "
                         f"the checkpoint ({', '.join(model_keys[:5])}{' ...' if len(model_keys) > 5 else ''}), so "
                         "their optimizer state cannot be restored: load with --no-load-optim (or --finetune)")
    print_rank_0(f"WARNING: --dist-ckpt-strictness {strictness}: {len(model_keys)} tensor(s) of this model are not in "
                 "the checkpoint and keep their initial values:\n    " + "\n    ".join(model_keys[:20])
                 + (f"\n    ... and {len(model_keys) - 20} more" if len(model_keys) > 20 else ""))
    return [t for t in tensors if t.key not in set(absent)], None


def _main_params_to_read(optimizer, args, load_optim: bool) -> dict:
    """--load-main-params-from-ckpt without the optimizer state: {model param: {"fp32_param":
    destination}} for the fp16/bf16 params (whose fp32 main copies the checkpoint holds)."""
    if load_optim or optimizer is None or args is None or not args.load_main_params_from_ckpt:
        return {}
    return {param: {"fp32_param": entry["fp32_param"]} for param, entry in empty_model_space_state(optimizer).items()
            if "fp32_param" in entry}


def load(directory: str, model, optimizer, groups: ProcessGroups, rank: int, load_optim: bool,
         load_rng: bool, common: dict, gather_problems: Callable[[str], List[str]], group,
         args=None) -> Optional[dict]:
    """Load model (and optimizer) state in place; returns this rank's RNG state or None.
    Every requested key and shape is checked against the checkpoint before any data is
    read; ``gather_problems`` combines the ranks' findings so that all ranks stop together."""
    placements = model_placements(model, groups)
    tensors = [chunk for tensor, placement in placements for chunk in placement.shard(tensor.data)]
    optimizer_states = empty_model_space_state(optimizer) if load_optim else {}
    main_params = _main_params_to_read(optimizer, args, load_optim)
    tensors.extend(_optimizer_chunks(placements, optimizer_states))
    tensors.extend(_optimizer_chunks(placements, main_params))
    objects = [ShardedObject(rng_key(rank))] if load_rng else []
    metadata = read_metadata(directory)
    if main_params and not any(key.startswith(f"{OPTIMIZER_PREFIX}fp32_param.") for key in metadata.state_dict_metadata):
        raise CheckpointError(f"--load-main-params-from-ckpt: {directory} holds no fp32 main params (it was saved "
                              "with --no-save-optim, or by a run with fp32 weights); drop the flag")
    fp8_report = Fp8LoadReport()
    saved_shapes = {key: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
                    if not isinstance(entry, BytesStorageMetadata)}
    tensors, fp8_resizes = fit_sharded_requests(tensors, saved_shapes, fp8_report)
    strictness = args.dist_ckpt_strictness if args is not None else STRICT_DEFAULT
    tensors, absent_problem = _drop_absent_if_allowed(tensors, metadata, strictness, load_optim, gather_problems)
    mismatch = compare_with_checkpoint(tensors, objects, metadata)
    problems = [p for p in gather_problems(mismatch.describe() if mismatch else "") if p]
    problems += [absent_problem] if absent_problem else []
    unexpected = drop_unused(_unexpected_model_keys(tensors, metadata, gather_problems), fp8_report)
    if unexpected:
        listing = (f"{len(unexpected)} key(s) in the checkpoint but not in this model:\n    "
                   + "\n    ".join(unexpected[:20] + ([f"... and {len(unexpected) - 20} more"]
                                                    if len(unexpected) > 20 else [])))
        if strictness in STRICT_MODES:
            problems.append(listing)
        else:
            print_rank_0(f"WARNING: --dist-ckpt-strictness {strictness}: not read, {listing}")
    saved_args = common.get("args")
    vocabulary = vocabulary_problem(saved_args, args) if args is not None else None
    if vocabulary:
        problems.append(vocabulary)
    if problems:
        details = "\n".join(sorted(set(problems)))
        flags = differing_flags(saved_args, args) if args is not None else []
        hint = ("Flags that differ from the saving run:\n    " + "\n    ".join(flags) if flags else
                "Check the model flags (--num-layers, --hidden-size, --ffn-hidden-size, --num-attention-heads, "
                "--group-query-attention/--num-query-groups, --swiglu, --untie-embeddings-and-output-weights, "
                "--num-experts ...) against the saving run")
        raise CheckpointError(
            f"{directory} does not fit this model; nothing was loaded.\n{details}\n{hint}\n"
            "Load with --no-load-optim if only optimizer keys differ."
        )
    log_report(fp8_report, gather_problems)
    try:
        load_sharded(tensors, objects, directory, group=group)
    except CheckpointException as error:
        raise CheckpointError(f"reading {directory} failed: {error}") from error
    finish_resizes(fp8_resizes)
    if main_params:
        install_main_params(optimizer, {param: entry["fp32_param"] for param, entry in main_params.items()})
    if load_optim:
        opt_common = common["optimizer"]
        load_model_space_state(optimizer, optimizer_states, opt_common["scalars"] or {"has_state": False})
    return objects[0].value if objects else None
