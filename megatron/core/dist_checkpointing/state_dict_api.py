"""Megatron-Core's state-dict style of distributed checkpointing: ``save(sharded_state_dict,
checkpoint_dir)`` and ``load(sharded_state_dict, checkpoint_dir)``, over this package's
``save_sharded`` / ``load_sharded``, and ``model_sharded_state_dict`` behind the models'
``sharded_state_dict()``.

A sharded state dict maps names to ``ShardedTensor`` chunks (a list of them when a tensor
is stored as several chunks, e.g. a fused fc1 split per tensor-parallel rank), to
``ShardedObject``s, to nested dicts, or to plain picklable values (kept as common state).
The tensors a model's ``sharded_state_dict()`` gives are its own parameters, so ``load``
fills the model in place; the dict it returns holds those same tensors, so the
``model.load_state_dict(loaded)`` Megatron-Core scripts call next is a plain copy.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.model_sharding import model_placements
from megatron.core.dist_checkpointing.serialization import load_sharded, save_sharded
from megatron.core.process_groups import resolve

_COMMON_PREFIX = "common_state/"


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "", pg_collection=None) -> Dict[str, Any]:
    """{``prefix`` + state-dict name: ShardedTensor (or list)} for every param and persistent
    buffer of ``model``; keys in the checkpoint are the global (layout-independent) names."""
    groups = resolve(pg_collection if pg_collection is not None else getattr(model, "pg_collection", None))
    placements = {id(tensor): placement for tensor, placement in model_placements([model], groups)}
    out: Dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        placement = placements.get(id(tensor))
        if placement is None:
            continue
        chunks = placement.shard(tensor.detach() if tensor.requires_grad else tensor)
        out[prefix + name] = chunks[0] if len(chunks) == 1 else chunks
    return out


def _flatten(tree: Dict[str, Any], path: str, tensors: List[ShardedTensor], objects: List[ShardedObject],
             plain: List[Tuple[str, ShardedObject]]) -> None:
    for name, value in tree.items():
        where = f"{path}{name}"
        if isinstance(value, dict):
            _flatten(value, where + ".", tensors, objects, plain)
        elif isinstance(value, ShardedTensor):
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, ShardedTensor) for v in value):
            tensors.extend(value)
        elif isinstance(value, ShardedObject):
            objects.append(value)
        else:
            holder = ShardedObject(_COMMON_PREFIX + where, value)
            objects.append(holder)
            plain.append((where, holder))


def save(sharded_state_dict: Dict[str, Any], checkpoint_dir: str, group=None) -> None:
    """Write ``sharded_state_dict`` to ``checkpoint_dir`` (collective over ``group``, default
    the world; every rank passes its own chunks)."""
    tensors, objects, plain = [], [], []
    _flatten(sharded_state_dict, "", tensors, objects, plain)
    save_sharded(tensors, objects, str(checkpoint_dir), group=group)


def _loaded(value: Any, where: str, plain: Dict[str, ShardedObject]) -> Any:
    if isinstance(value, dict):
        return {name: _loaded(item, f"{where}{name}.", plain) for name, item in value.items()}
    if isinstance(value, ShardedTensor):
        return value.data
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, ShardedTensor) for v in value):
        # The chunks are views of one tensor (``TensorPlacement.shard``): give that tensor.
        base = value[0].data._base
        return base if base is not None else torch.cat([v.data for v in value], dim=0)
    if isinstance(value, ShardedObject):
        return value.value
    return plain[where[:-1]].value


def load(sharded_state_dict: Dict[str, Any], checkpoint_dir: str, group=None) -> Dict[str, Any]:
    """Fill ``sharded_state_dict``'s tensors from ``checkpoint_dir`` and return the dict with
    each ShardedTensor replaced by its filled tensor and each object by its saved value."""
    tensors, objects, plain = [], [], []
    _flatten(sharded_state_dict, "", tensors, objects, plain)
    load_sharded(tensors, objects, str(checkpoint_dir), group=group)
    return {name: _loaded(item, f"{name}.", dict(plain)) for name, item in sharded_state_dict.items()}
