"""Megatron-LM's legacy ``--ckpt-format torch`` checkpoints: one ``model_optim_rng.pt``
per model-parallel rank, ``mp_rank_<tp:02d>[_<pp:03d>][_<ep:03d>]`` (the PP suffix when the
saving run had PP > 1, the EP suffix when EP > 1).

Reading merges every rank's file into full tensors under our global names, then copies
each rank's chunks out of them, so a checkpoint of any TP/PP/EP (and virtual pipeline)
layout loads into any layout here:
- layers are numbered per pipeline stage (and model chunk ``model<v>`` with virtual
  stages): the stage's first global layer is added;
- experts are numbered per expert-parallel rank: rank * (experts / EP) is added;
- tensor-parallel shards are concatenated along the partition dim (rows for QKV, fc1, the
  vocabulary, a Mamba mixer's per-head tensors; columns for proj, fc2 and the mixer's
  out_proj); a gated fc1 shard is [gate_i ; up_i], the full tensor [gate ; up]; a mixer's
  in_proj shard is [z_i ; x_i ; B_i ; C_i ; dt_i] and its conv1d shard [x_i ; B_i ; C_i],
  merged part by part (the part sizes follow from the layer's shards: heads from dt_bias,
  conv channels from conv1d);
- a hybrid model's stages follow the ``|`` cuts of its --hybrid-layer-pattern, if any;
- Transformer Engine names (``linear_qkv.layer_norm_weight``, grouped experts'
  ``weight<j>``) become the local-spec names; ``_extra_state`` entries are dropped.
A checkpoint from Megatron-LM has no ``manifest.json``, which every checkpoint of ours has;
one of ours in Megatron-LM's layout has a manifest whose ``key_layout`` says so.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.core.dist_checkpointing.model_sharding import model_placements, unwrapped
from megatron.core.models.mamba.layer_pattern import stage_segment
from megatron.core.fp8.scaling import is_fp8_scaling_key
from megatron.core.process_groups import ProcessGroups
from megatron.core.safe_unpickle import RefusedPickle
from megatron.training.checkpointing import torch_format
from megatron.training.checkpointing.directory import CheckpointError
from megatron.training.checkpointing.fp8_state import Fp8LoadReport, log_report
from megatron.training.checkpointing.manifest import MANIFEST_FILENAME, MEGATRON_LM_KEY_LAYOUT, read_manifest
from megatron.training.checkpointing.megatron_lm import keys, pickles, run_args

_GROUPED_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<j>\d+)$")
_LOCAL_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.local_experts\.)(?P<j>\d+)\.(?P<rest>.+)$")
_ROWS = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
         "word_embeddings.weight", "output_layer.weight", "output_layer.bias",
         "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight")
_COLUMNS = ("linear_proj.weight", "linear_fc2.weight", "mixer.out_proj.weight")


def is_megatron_legacy(directory: str) -> bool:
    """A torch-format checkpoint written by Megatron-LM (no manifest) or by our
    --ckpt-megatron-lm-layout (a manifest that says so)."""
    if not torch_format.is_torch_checkpoint(directory):
        return False
    if not os.path.isfile(os.path.join(directory, MANIFEST_FILENAME)):
        return True
    return (read_manifest(directory) or {}).get("key_layout") == MEGATRON_LM_KEY_LAYOUT


def _load(path: str) -> dict:
    try:
        return pickles.load_torch_file(path)
    except RefusedPickle as error:
        raise CheckpointError(str(error)) from None


def first_file(directory: str) -> str:
    names = sorted(n for n in os.listdir(directory) if n.startswith("mp_rank_00"))
    for name in names:
        path = os.path.join(directory, name, torch_format.MODEL_FILENAME)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{directory}: no mp_rank_00*/{torch_format.MODEL_FILENAME}")


def read_args(directory: str):
    """The saved args (Megatron's Namespace, enums as stand-ins) of the first rank's file."""
    return _load(first_file(directory)).get("args")


def _sizes(saved) -> Tuple[int, int, int]:
    return tuple(int(getattr(saved, name, 1) or 1) for name in
                 ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))


def _stage_offsets(saved, pp: int, chunks: int) -> Dict[Tuple[int, int], int]:
    """{(pipeline rank, model chunk): global index of its first layer}, as Megatron splits."""
    layers = int(saved.num_layers)
    pattern = getattr(saved, "hybrid_layer_pattern", None)
    if pattern and "|" in pattern:
        return {(r, v): stage_segment(pattern, pp, r, chunks, v)[1] for r in range(pp) for v in range(chunks)}
    if getattr(saved, "pipeline_model_parallel_layout", None):
        raise CheckpointError("Megatron-LM torch checkpoints saved with --pipeline-model-parallel-layout are not "
                              "supported; convert it to torch_dist with Megatron-LM first")
    first = getattr(saved, "decoder_first_pipeline_num_layers", None)
    last = getattr(saved, "decoder_last_pipeline_num_layers", None)
    if (first or last) and chunks == 1 and pp > 1:
        middle_layers = layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        per = middle_layers // middle_stages if middle_stages else 0
        sizes = [first if (r == 0 and first) else last if (r == pp - 1 and last) else per for r in range(pp)]
        return {(r, 0): sum(sizes[:r]) for r in range(pp)}
    if layers % (pp * chunks):
        raise CheckpointError(f"{layers} layers do not split evenly over {pp} stages x {chunks} model chunks")
    per = layers // (pp * chunks)
    return {(r, v): (v * pp + r) * per for r in range(pp) for v in range(chunks)}


def _our_name(key: str, layer_offset: int, expert_offset: int) -> Optional[str]:
    """Our global name for a key of one rank's model chunk, or None for ``_extra_state``."""
    if key.endswith(keys.EXTRA_STATE) or "._extra_state" in key:
        return None
    grouped = _GROUPED_EXPERT.match(key)
    if grouped:
        key = f"{grouped['pre']}local_experts.{grouped['j']}.{grouped['fc']}.{grouped['kind']}"
    layer = keys.LAYER.match(key)
    if layer is None:
        return key
    rest = keys.local_norm_name(layer["rest"])
    local = _LOCAL_EXPERT.match(f"decoder.layers.0.{rest}")
    if local:
        rest = f"mlp.experts.local_experts.{int(local['j']) + expert_offset}.{local['rest']}"
    return f"{layer['stack']}.layers.{int(layer['index']) + layer_offset}.{rest}"


def _mixer_part_sizes(name: str, shards: Dict[str, Dict[int, torch.Tensor]], rank: int) -> List[int]:
    """The local part sizes of a mixer's fused tensor ``name`` on tensor-parallel ``rank``,
    from its layer's shards: conv channels = d + 2GN, in_proj rows = 2d + 2GN + H."""
    prefix = name[: name.rindex("mixer.") + len("mixer.")]
    try:
        heads = shards[prefix + "dt_bias"][rank].shape[0]
        conv = shards[prefix + "conv1d.weight"][rank].shape[0]
        inner = shards[prefix + "in_proj.weight"][rank].shape[0] - conv - heads
    except KeyError as missing:
        raise CheckpointError(f"{name}: the layer's {missing} shard of tensor-parallel rank {rank} is missing, so "
                              "its parts cannot be told apart") from None
    groups_state = (conv - inner) // 2
    return [inner, inner, groups_state, groups_state, heads] if name.endswith("in_proj.weight") else \
        [inner, groups_state, groups_state]


def _merge_parts(shards: List[torch.Tensor], sizes: List[int]) -> torch.Tensor:
    """Shards of [part_0 ; part_1 ; ...] each -> [part_0 of every rank ; part_1 of every rank ; ...]."""
    split = [shard.split(sizes, dim=0) for shard in shards]
    return torch.cat([piece[j] for j in range(len(sizes)) for piece in split], dim=0)


def _merge(name: str, shards: List[torch.Tensor], gated: bool) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if name.endswith(_COLUMNS):
        return torch.cat(shards, dim=1)
    if not name.endswith(_ROWS):
        return shards[0]  # replicated over tensor-parallel ranks
    if gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(shards, dim=0)


def merged_state(directory: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(full tensors under our global names, the first rank's file without its model)."""
    head_path = first_file(directory)
    head = _load(head_path)
    saved = head.get("args")
    if saved is None:
        raise CheckpointError(f"{head_path}: no 'args' entry; not a Megatron-LM checkpoint file")
    if float(head.get("checkpoint_version", 0)) < 2.0:
        raise CheckpointError(f"{directory}: checkpoint_version {head.get('checkpoint_version')} (QKV in the pre-2.0 "
                              "row order) is not supported; re-save it with a current Megatron-LM")
    tp, pp, ep = _sizes(saved)
    etp = getattr(saved, "expert_tensor_parallel_size", None) or tp
    if getattr(saved, "num_experts", None) and etp != tp:
        raise CheckpointError(f"{directory}: expert tensor-parallel size {etp} != tensor-parallel size {tp} is not "
                              "supported for torch-format checkpoints; save it as torch_dist with Megatron-LM")
    experts_per_rank = (int(saved.num_experts) // ep) if getattr(saved, "num_experts", None) else 0
    gated = bool(getattr(saved, "swiglu", False) or getattr(saved, "quick_geglu", False))
    shards: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
    offsets = None
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                path = os.path.join(directory, torch_format.rank_dir_name(t, p, e, pp, ep), torch_format.MODEL_FILENAME)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path} is missing: the checkpoint's args say TP={tp} PP={pp} EP={ep}")
                state = head if path == head_path else _load(path)
                chunk_keys = sorted(k for k in state if re.fullmatch(r"model\d*", k))
                if any(k.startswith("language_model.") for c in chunk_keys for k in state[c]):
                    raise CheckpointError(f"{path} holds a pre-Core Megatron model (language_model.*), which is not "
                                          "supported; convert it to a Megatron-Core checkpoint with Megatron-LM first")
                offsets = offsets or _stage_offsets(saved, pp, len(chunk_keys))
                for v, chunk_key in enumerate(chunk_keys):
                    for key, tensor in state[chunk_key].items():
                        name = _our_name(key, offsets[(p, v)], e * experts_per_rank)
                        if name is not None and isinstance(tensor, torch.Tensor):
                            shards[name].setdefault(t, tensor)
    full = {}
    for name, by_rank in shards.items():
        ranks = sorted(by_rank)
        if keys.fused_parts(name) is not None and len(ranks) > 1:
            full[name] = _merge_parts([by_rank[t] for t in ranks], _mixer_part_sizes(name, shards, ranks[0]))
        else:
            full[name] = _merge(name, [by_rank[t] for t in ranks], gated)
    return full, {k: v for k, v in head.items() if not re.fullmatch(r"model\d*", k)}


def _copy_chunks(full: Dict[str, torch.Tensor], model, groups: ProcessGroups, fp8_report: Fp8LoadReport
                 ) -> Tuple[List[Callable[[], None]], List[str]]:
    """(the copies of this rank's chunks out of ``full``, what does not fit); copies nothing
    yet. FP8 scaling state the checkpoint lacks keeps its fresh values (noted in ``fp8_report``)."""
    copies, problems = [], []
    for tensor, placement in model_placements(model, groups):
        source = full.get(placement.key)
        if source is None and is_fp8_scaling_key(placement.key):
            fp8_report.note_fresh(placement.key)
            continue
        if source is None:
            problems.append(f"missing from the checkpoint: {placement.key} {placement.global_shape}")
            continue
        same_rank = source.dim() == len(placement.global_shape)
        if tuple(source.shape) != placement.global_shape and not (placement.allow_shape_mismatch and same_rank):
            problems.append(f"{placement.key}: checkpoint {tuple(source.shape)}, this model {placement.global_shape}")
            continue
        for chunk in placement.shard(tensor.data):
            region = tuple(slice(o, min(o + n, limit)) for o, n, limit in
                           zip(chunk.global_offset, chunk.local_shape, source.shape))
            piece = source[region]
            target = chunk.data[tuple(slice(0, n) for n in piece.shape)]
            copies.append(lambda target=target, piece=piece: target.copy_(piece))
    return copies, problems


def load(directory: str, model, groups: ProcessGroups, gather_problems: Callable[[str], List[str]]) -> dict:
    """Read the model weights in place; returns the first file's non-model entries (args,
    iteration, ...). All ranks check every key and shape before any weight is touched."""
    full, head = merged_state(directory)
    fp8_report = Fp8LoadReport()
    copies, problems = _copy_chunks(full, model, groups, fp8_report)
    gathered = [p for p in gather_problems("\n".join(problems)) if p]
    if gathered:
        lines = sorted(set("\n".join(gathered).splitlines()))
        details = "\n".join(lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else []))
        raise CheckpointError(
            f"{directory} (a Megatron-LM torch checkpoint) does not fit this model; nothing was loaded.\n"
            f"{details}\nPass the saving run's model flags, or --use-checkpoint-args to take them from it."
        )
    log_report(fp8_report, gather_problems)
    with torch.no_grad():
        for copy in copies:
            copy()
    return head


def _te_names(key: str) -> str:
    """``decoder.layers.3.norm.weight`` -> ``decoder.layers.3.mixer.in_proj.layer_norm_weight``
    (Transformer Engine's names of the norms fused into the next linear)."""
    layer = keys.LAYER.match(key)
    return key if layer is None else f"{layer['stack']}.layers.{layer['index']}.{keys.te_norm_name(layer['rest'])}"


def build_payload(args, iteration: int, model, num_flops: float, groups: ProcessGroups):
    """(subdirectory, Megatron-LM's state dict, None) for a writing rank, None for the others:
    our state dict plus Megatron's ``_extra_state`` entries, its args and version; no
    optimizer or RNG state, and no FP8 scaling state (Megatron-LM keeps that in Transformer
    Engine's extra state, written empty here; its strict load would refuse our keys)."""
    if not torch_format.is_writer(groups):
        return None
    state = run_args.legacy_state(args, iteration, num_flops)
    chunks = [unwrapped(c) for c in model]
    for index, chunk in enumerate(chunks):
        model_state = {k: v for k, v in chunk.state_dict().items() if not is_fp8_scaling_key(k)}
        if getattr(chunk, "megatron_te_norm_names", False):
            model_state = {_te_names(key): value for key, value in model_state.items()}
        for key in list(model_state):
            owner = keys.extra_state_owner(key)
            if owner is not None:
                model_state[f"{owner}.{keys.EXTRA_STATE}"] = None
        if getattr(chunk, "post_process", False):
            # Megatron's output layer exists (and has extra state) even when tied to the embedding.
            model_state.setdefault(f"output_layer.{keys.EXTRA_STATE}", None)
        state["model" if len(chunks) == 1 else f"model{index}"] = model_state
    subdir = torch_format.rank_dir_name(groups.rank("tp"), groups.rank("pp"), groups.rank("ep"), groups.size("pp"),
                                        groups.size("ep"))
    return subdir, state, None
