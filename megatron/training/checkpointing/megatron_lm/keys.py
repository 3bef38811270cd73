"""Megatron-LM's checkpoint key names for our model's tensors, both ways.

Our global names (``model_sharding``) are Megatron's local-spec names with global layer
and expert indices: ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``.
Megatron-LM's torch_dist checkpoints store them differently:

- a homogeneous stack of layers is one tensor per name with a leading layer axis,
  ``decoder.layers.mlp.linear_fc1.weight`` [num_layers, ...]; non-homogeneous stacks
  (MoE every k-th layer) keep per-layer keys ``decoder.layers.3.…``;
- experts get a leading expert axis under ``mlp.experts.experts.…`` [.., num_experts, ...];
- the layer norms use the Transformer Engine names, with the local spec too:
  ``input_layernorm.X`` -> ``self_attention.linear_qkv.layer_norm_X``,
  ``pre_mlp_layernorm.X`` -> ``mlp.linear_fc1.layer_norm_X``, and a hybrid model's Mamba
  layer ``norm.X`` -> ``mixer.in_proj.layer_norm_X``;
- each linear layer has a pickled ``_extra_state`` entry (``[None]`` without FP8);
- hybrid (Mamba) stacks always keep per-layer keys, and a Mamba mixer's fused tensors are
  stored as one tensor per part: ``mixer.in_proj.weight.z`` (``.x``, ``.B``, ``.C``,
  ``.dt``), ``mixer.conv1d.weight.x`` (``.B``, ``.C``), the same for ``conv1d.bias``; each
  part is split over the tensor-parallel ranks on its own.

Legacy (``torch`` format) files use per-layer names local to the pipeline stage, the
local spec's norm names, or the TE names when Megatron ran with Transformer Engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

# A layer's tensor: the stack (``decoder``; BERT's ``encoder``), the layer index, the rest.
LAYER = re.compile(r"^(?P<stack>decoder|encoder)\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")
EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
NORM_TO_TE = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
              ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
              ("norm.", "mixer.in_proj.layer_norm_"))
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
# A Mamba mixer's fused tensors (rows [z ; x ; B ; C ; dt] and [x ; B ; C]) and the names
# of their parts, the suffixes of Megatron's keys.
FUSED_PARTS = {"mixer.in_proj.weight": ("z", "x", "B", "C", "dt"),
               "mixer.conv1d.weight": ("x", "B", "C"),
               "mixer.conv1d.bias": ("x", "B", "C")}
EXTRA_STATE = "_extra_state"


@dataclass(frozen=True)
class MegatronKey:
    """Where one of our tensors lives in a Megatron torch_dist checkpoint: the key and the
    axes prepended to its shape, each (index, size): layer, then expert."""

    key: str
    axes: Tuple[Tuple[int, int], ...] = ()

    def object_key(self) -> str:
        """Megatron's unique key of a ShardedObject at these axes (``key/shard_1.0_2.4``)."""
        if not self.axes:
            return f"{self.key}/shard_0_1"
        offsets = ".".join(str(i) for i, _ in self.axes)
        sizes = ".".join(str(n) for _, n in self.axes)
        return f"{self.key}/shard_{offsets}_{sizes}"


def te_norm_name(rest: str) -> str:
    """``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight``."""
    for ours, te in NORM_TO_TE:
        if rest.startswith(ours):
            return te + rest[len(ours):]
    return rest


def local_norm_name(rest: str) -> str:
    """The inverse of ``te_norm_name`` (other names unchanged)."""
    for ours, te in NORM_TO_TE:
        if rest.startswith(te):
            return ours + rest[len(te):]
    return rest


def fused_parts(name: str) -> Optional[Tuple[str, ...]]:
    """The part names of a fused tensor Megatron stores part by part, else None."""
    for suffix, parts in FUSED_PARTS.items():
        if name.endswith("." + suffix):
            return parts
    return None


def megatron_keys(name: str, num_layers: int, num_experts: Optional[int]) -> List[MegatronKey]:
    """Candidate Megatron keys of our tensor ``name``, the one Megatron writes first:
    stacked then per-layer, TE norm names then local ones."""
    layer = LAYER.match(name)
    if layer is None:
        return [MegatronKey(name)]
    stack, index, rest = layer["stack"], int(layer["index"]), layer["rest"]
    expert = EXPERT.match(rest)
    expert_axes: Tuple[Tuple[int, int], ...] = ()
    if expert is not None:
        if not num_experts:
            raise ValueError(f"{name}: an expert tensor, but the model has no --num-experts")
        expert_axes = ((int(expert.group(1)), num_experts),)
        rest = f"mlp.experts.experts.{expert.group(2)}"
    names = list(dict.fromkeys((te_norm_name(rest), rest)))
    stacked = [MegatronKey(f"{stack}.layers.{r}", ((index, num_layers),) + expert_axes) for r in names]
    per_layer = [MegatronKey(f"{stack}.layers.{index}.{r}", expert_axes) for r in names]
    return stacked + per_layer


def extra_state_owner(name: str) -> Optional[str]:
    """For the weight of a linear layer (``....linear_fc1.weight``, ``output_layer.weight``)
    the module name that carries an ``_extra_state`` entry in Megatron; else None."""
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    last = module.rsplit(".", 1)[-1]
    if last in LINEARS or module == "output_layer":
        return module
    return None
