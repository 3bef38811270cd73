"""Where each local model tensor sits in the layout-independent checkpoint key space.

Keys are the model's own parameter names with global indices: a transformer layer is
``decoder.layers.<layer_number - 1>`` whatever pipeline stage or virtual chunk holds it,
an expert is ``...experts.local_experts.<global expert index>`` whatever expert-parallel
rank holds it (local expert i on rank r is global expert r * E/EP + i). The last
pipeline stage's copy of a tied word embedding is stored under the first stage's key.

Tensor-parallel params (``tensor_model_parallel`` with ``partition_dim`` and
``partition_stride``) are chunks of the full tensor. A stride-s param holds s pieces
along its partition dim, piece j of rank r at global offset j * G/s + r * L/s (G global,
L local size): for a gated MLP's fc1 the full tensor is [gate_all ; up_all], as in
Megatron's torch_dist checkpoints. A param with ``partition_sizes`` is a concatenation of
unequal parts, each split over the ranks (the Mamba mixer's fused weights). The word embedding and the output layer may differ in
their padded vocabulary size between layouts; they load where the two overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.process_groups import ProcessGroups, group_rank, group_size

_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_TIED_EMBEDDING_KEY = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class TensorPlacement:
    """How a local tensor of one param's shape maps to its global tensor."""

    key: str
    global_shape: Tuple[int, ...]
    # (local start, length, global offset) along ``dim`` for each piece; one piece for
    # unsplit or stride-1 tensors.
    dim: int
    pieces: Tuple[Tuple[int, int, int], ...]
    allow_shape_mismatch: bool = False

    def shard(self, tensor: torch.Tensor, key: Optional[str] = None) -> List[ShardedTensor]:
        """``tensor`` (the param, or a state of its shape) as sharded chunks under ``key``."""
        out = []
        for start, length, offset in self.pieces:
            view = tensor if len(self.pieces) == 1 else tensor.narrow(self.dim, start, length)
            global_offset = [0] * tensor.dim()
            if tensor.dim():
                global_offset[self.dim] = offset
            out.append(ShardedTensor(key or self.key, view, self.global_shape, tuple(global_offset),
                                     self.allow_shape_mismatch))
        return out


def _global_index(owner: torch.nn.Module, list_name: str, position: int, item: torch.nn.Module) -> int:
    if list_name == "layers" and hasattr(item, "layer_number"):
        return int(item.layer_number) - 1
    if list_name == "local_experts" and hasattr(owner, "local_expert_indices"):
        return int(owner.local_expert_indices[position])
    return position


def global_tensor_names(module: torch.nn.Module) -> Dict[torch.Tensor, str]:
    """{param or persistent buffer: its global name} for one model chunk (unwrapped)."""
    names: Dict[torch.Tensor, str] = {}

    def visit(current: torch.nn.Module, prefix: str) -> None:
        for name, param in current.named_parameters(recurse=False):
            names.setdefault(param, prefix + name)
        for name, buffer in current.named_buffers(recurse=False):
            if buffer is not None and name not in current._non_persistent_buffers_set:
                names.setdefault(buffer, prefix + name)
        for child_name, child in current.named_children():
            if isinstance(child, torch.nn.ModuleList):
                for position, item in enumerate(child):
                    index = _global_index(current, child_name, position, item)
                    visit(item, f"{prefix}{child_name}.{index}.")
            else:
                visit(child, f"{prefix}{child_name}.")

    visit(module, "")
    return names


def _is_expert(name: str) -> bool:
    return ".experts.local_experts." in name


def _part_pieces(name: str, local: int, sizes, world: int, rank: int) -> Tuple[Tuple[int, int, int], ...]:
    """Pieces of a concatenation of unequal parts, each split separately over the ranks
    (``partition_sizes`` = the local part sizes, e.g. the Mamba in-projection's
    [z ; x ; B ; C ; dt]): local part j sits at sum(sizes[:j]), globally at
    world * sum(sizes[:j]) + rank * sizes[j]."""
    if sum(sizes) != local:
        raise ValueError(f"{name}: partition_sizes {tuple(sizes)} do not add up to the local size {local}")
    pieces, start = [], 0
    for part in sizes:
        pieces.append((start, part, world * start + rank * part))
        start += part
    return tuple(pieces)


def tensor_placement(name: str, tensor: torch.Tensor, groups: ProcessGroups) -> TensorPlacement:
    """The placement of a param or buffer named ``name`` (global name) on this rank."""
    key = _TIED_EMBEDDING_KEY if getattr(tensor, "shared_embedding", False) else name
    allow_mismatch = key in _VOCAB_KEYS
    shape = tuple(tensor.shape)
    group = groups.expt_tp if _is_expert(name) else groups.tp
    size, rank = group_size(group), group_rank(group)
    if not getattr(tensor, "tensor_model_parallel", False) or size == 1 or tensor.dim() == 0:
        return TensorPlacement(key, shape, 0, ((0, shape[0] if shape else 1, 0),), allow_mismatch)
    dim = int(getattr(tensor, "partition_dim"))
    global_shape = list(shape)
    global_shape[dim] = shape[dim] * size
    sizes = getattr(tensor, "partition_sizes", None)
    if sizes:
        return TensorPlacement(key, tuple(global_shape), dim, _part_pieces(name, shape[dim], sizes, size, rank),
                               allow_mismatch)
    stride = int(getattr(tensor, "partition_stride", 1) or 1)
    local = shape[dim]
    if local % stride:
        raise ValueError(f"{name}: local size {local} along dim {dim} is not divisible by its stride {stride}")
    piece = local // stride
    pieces = tuple((j * piece, piece, j * (global_shape[dim] // stride) + rank * piece) for j in range(stride))
    return TensorPlacement(key, tuple(global_shape), dim, pieces, allow_mismatch)


def unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """A model chunk without its data-parallel and precision wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_placements(chunks: Sequence[torch.nn.Module], groups: ProcessGroups
                     ) -> List[Tuple[torch.Tensor, TensorPlacement]]:
    """(tensor, placement) for every param and persistent buffer of this rank's chunks
    (each chunk unwrapped from DDP / precision wrappers)."""
    out = []
    seen = set()
    for chunk in chunks:
        for tensor, name in global_tensor_names(unwrapped(chunk)).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out.append((tensor, tensor_placement(name, tensor, groups)))
    return out
