"""Megatron-LM's ``--ckpt-format torch_dist`` checkpoints: read into our model in any
parallel layout, and written in Megatron's own key layout (``keys``).

A Megatron-LM torch_dist directory is told apart from ours by its common state: Megatron
stores it as the ShardedObject ``common_state/shard_0_1`` inside the distcp files (up to
Megatron-Core 0.18, as ``common.pt``), we as ``common_state``. Our tensors are read as
chunks of Megatron's global tensors (stacked layers, stacked experts), so the TP/PP/EP
layout of either side does not matter.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.model_sharding import model_placements, unwrapped
from megatron.core.dist_checkpointing.planner import ShardedLoadPlanner
from megatron.core.fp8.scaling import is_fp8_scaling_key
from megatron.core.process_groups import ProcessGroups, group_rank, group_size
from megatron.core.safe_unpickle import RefusedPickle
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.fp8_state import Fp8LoadReport, log_report
from megatron.training.checkpointing.megatron_lm import keys, pickles, run_args
from megatron.training.checkpointing.torch_dist_format import is_torch_dist_checkpoint

COMMON_KEY = "common_state/shard_0_1"
COMMON_FILE = "common.pt"  # Megatron-Core <= 0.18


def read_metadata(directory: str) -> Metadata:
    try:
        return pickles.SafeMetadataReader(directory).read_metadata()
    except RefusedPickle as error:
        raise CheckpointError(f"{directory}/.metadata: {error}") from None


def is_megatron_torch_dist(directory: str) -> bool:
    if not is_torch_dist_checkpoint(directory):
        return False
    if os.path.isfile(os.path.join(directory, COMMON_FILE)):
        return True
    # The key is a plain string in the pickled .metadata: found without unpickling anything.
    try:
        with open(os.path.join(directory, ".metadata"), "rb") as handle:
            return COMMON_KEY.encode() in handle.read()
    except OSError:
        return False


def read_common(directory: str) -> dict:
    """Megatron's common state (args, iteration, ...), read without running code."""
    path = os.path.join(directory, COMMON_FILE)
    try:
        if os.path.isfile(path):
            common = pickles.load_torch_file(path)
        else:
            common = pickles.read_object(directory, read_metadata(directory), COMMON_KEY)
    except RefusedPickle as error:
        raise CheckpointError(str(error)) from None
    if isinstance(common, list) and len(common) == 1:
        common = common[0]  # Megatron saves the common ShardedObject as a one-element list
    if not isinstance(common, dict):
        raise CheckpointError(f"{directory}: the common state is a {type(common).__name__}, not a dict")
    return common


def _homogeneous(args) -> bool:
    """Whether Megatron stacks the layers (all layers alike): no MoE, or MoE in every layer;
    never in a hybrid model, whose stack Megatron saves layer by layer."""
    if getattr(args, "is_hybrid_model", False):
        return False
    if not getattr(args, "num_experts", None):
        return True
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    return all(moe_layer_pattern(args.num_layers, args.moe_layer_freq))


def _with_axes(chunk: ShardedTensor, key: keys.MegatronKey) -> ShardedTensor:
    data = chunk.data
    for _ in key.axes:
        data = data.unsqueeze(0)
    return ShardedTensor(key.key, data, tuple(n for _, n in key.axes) + chunk.global_shape,
                         tuple(i for i, _ in key.axes) + chunk.global_offset, chunk.allow_shape_mismatch)


def _choose(candidates: List[keys.MegatronKey], metadata: Metadata, parts) -> Optional[keys.MegatronKey]:
    """The first candidate key the checkpoint holds as a tensor (its first part's key for a
    tensor stored part by part)."""
    saved = metadata.state_dict_metadata
    for candidate in candidates:
        key = candidate.key if parts is None else f"{candidate.key}.{parts[0]}"
        if isinstance(saved.get(key), TensorStorageMetadata):
            return candidate
    return None


def _chunks(param, data, placement, chosen: keys.MegatronKey, groups: ProcessGroups) -> List[ShardedTensor]:
    """This rank's chunks of ``param`` (values ``data``) under Megatron's key ``chosen``: the
    placement's chunks, or for a fused tensor Megatron stores part by part, one chunk per
    part, each part split over the tensor-parallel ranks on its own."""
    parts = keys.fused_parts(placement.key)
    if parts is None:
        return [_with_axes(chunk, chosen) for chunk in placement.shard(data)]
    sizes = getattr(param, "partition_sizes", None)
    if sizes is None or len(sizes) != len(parts):
        raise ValueError(f"{placement.key}: expected the local sizes of its parts {parts} (partition_sizes), "
                         f"got {sizes}")
    tp, rank = group_size(groups.tp), group_rank(groups.tp)
    rest = tuple(data.shape[1:])
    out, start = [], 0
    for part, size in zip(parts, sizes):
        chunk = ShardedTensor(chosen.key, data.narrow(0, start, size), (size * tp,) + rest,
                              (rank * size,) + (0,) * len(rest))
        out.append(_with_axes(chunk, keys.MegatronKey(f"{chosen.key}.{part}", chosen.axes)))
        start += size
    return out


def load_requests(directory: str, model, groups: ProcessGroups, args, fp8_report: Optional[Fp8LoadReport] = None
                  ) -> Tuple[List[ShardedTensor], List[str]]:
    """This rank's chunks as Megatron keys, and what does not fit the checkpoint. FP8
    scaling state the checkpoint lacks is not asked for (noted in ``fp8_report``)."""
    metadata = read_metadata(directory)
    saved = metadata.state_dict_metadata
    requests, problems, missing = [], [], set()
    for tensor, placement in model_placements(model, groups):
        candidates = keys.megatron_keys(placement.key, args.num_layers, getattr(args, "num_experts", None))
        chosen = _choose(candidates, metadata, keys.fused_parts(placement.key))
        if chosen is None and is_fp8_scaling_key(placement.key) and fp8_report is not None:
            fp8_report.note_fresh(placement.key)
            continue
        if chosen is None:
            if candidates[0].key not in missing:  # one line per Megatron key, not per layer or expert
                missing.add(candidates[0].key)
                problems.append(f"missing from the checkpoint: {candidates[0].key} (ours: {placement.key})")
            continue
        for request in _chunks(tensor, tensor.data, placement, chosen, groups):
            entry = saved.get(request.key)
            if not isinstance(entry, TensorStorageMetadata):
                problems.append(f"missing from the checkpoint: {request.key} (ours: {placement.key})")
                break
            size = tuple(entry.size)
            padded_vocab = request.allow_shape_mismatch and len(size) == len(request.global_shape)
            if size != request.global_shape and not padded_vocab:
                problems.append(f"{request.key}: checkpoint {size}, this model {request.global_shape}")
                break
            requests.append(request)
    return requests, problems


def load(directory: str, model, groups: ProcessGroups, args, gather_problems: Callable[[str], List[str]],
         group) -> dict:
    """Read the model weights in place; returns Megatron's common state. Every key and
    shape is checked (on all ranks) before any weight is touched."""
    common = read_common(directory)
    fp8_report = Fp8LoadReport()
    requests, problems = load_requests(directory, model, groups, args, fp8_report)
    gathered = [p for p in gather_problems("\n".join(problems)) if p]
    if gathered:
        lines = sorted(set("\n".join(gathered).splitlines()))
        details = "\n".join(lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else []))
        raise CheckpointError(
            f"{directory} (a Megatron-LM torch_dist checkpoint) does not fit this model; nothing was loaded.\n"
            f"{details}\nPass the saving run's model flags, or --use-checkpoint-args to take them from it."
        )
    log_report(fp8_report, gather_problems)
    try:
        dcp.load({}, storage_reader=pickles.SafeMetadataReader(directory), planner=ShardedLoadPlanner(requests, []),
                 process_group=group, no_dist=not (dist.is_available() and dist.is_initialized()))
    except CheckpointException as error:
        raise CheckpointError(f"reading {directory} failed: {error}") from error
    return common


def build_save_items(model, groups: ProcessGroups, rank: int, args, iteration: int, num_flops: float,
                     to_cpu: bool) -> Tuple[List[ShardedTensor], List[ShardedObject]]:
    """This rank's chunks and objects under Megatron-LM's keys (rank 0 adds the common state).
    FP8 scaling state is left out: Megatron-LM keeps it in Transformer Engine's extra state,
    which this layout writes empty (a run loading the checkpoint starts FP8 scaling fresh)."""
    stacked = _homogeneous(args)
    output_extra_state = all(getattr(unwrapped(chunk), "megatron_output_extra_state", True) for chunk in model)
    tensors: List[ShardedTensor] = []
    objects = {}
    for tensor, placement in model_placements(model, groups):
        if is_fp8_scaling_key(placement.key):
            continue
        candidates = keys.megatron_keys(placement.key, args.num_layers, getattr(args, "num_experts", None))
        # candidates: the stacked names, then as many per-layer ones; Megatron writes the first of each
        chosen = candidates[0] if stacked or len(candidates) == 1 else candidates[len(candidates) // 2]
        for request in _chunks(tensor, tensor.detach(), placement, chosen, groups):
            if to_cpu:
                # Background writes need a snapshot: training goes on changing the live tensors.
                request.data = request.data.to("cpu", copy=True)
            tensors.append(request)
        owner = keys.extra_state_owner(chosen.key)
        if owner is not None and (owner != "output_layer" or output_extra_state):
            extra = keys.MegatronKey(f"{owner}.{keys.EXTRA_STATE}", chosen.axes).object_key()
            objects[extra] = ShardedObject(extra, [None])  # no FP8 metadata: what Megatron saves then
    if rank == 0:
        objects[COMMON_KEY] = ShardedObject(COMMON_KEY, [run_args.common_state(args, iteration, num_flops)])
    return tensors, list(objects.values())

