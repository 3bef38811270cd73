"""The submodule records of Megatron-Core layer specs (``TransformerLayerSubmodules``,
``SelfAttentionSubmodules``, ``MLASelfAttentionSubmodules``, ``MLPSubmodules``, ``MoESubmodules``,
``TransformerBlockSubmodules``).

Our layers are built from the ``TransformerConfig``, not from these records; GPTModel reads
a spec made of them only to check that it asks for nothing other than what the config builds
(``megatron.core.models.gpt.spec_check``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

Spec = Union[Any, type]


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: Optional[Spec] = None
    core_attention: Optional[Spec] = None
    linear_proj: Optional[Spec] = None
    q_layernorm: Optional[Spec] = None
    k_layernorm: Optional[Spec] = None


@dataclass
class MLASelfAttentionSubmodules:
    linear_q_proj: Optional[Spec] = None
    linear_q_down_proj: Optional[Spec] = None
    linear_q_up_proj: Optional[Spec] = None
    linear_kv_down_proj: Optional[Spec] = None
    linear_kv_up_proj: Optional[Spec] = None
    core_attention: Optional[Spec] = None
    linear_proj: Optional[Spec] = None
    q_layernorm: Optional[Spec] = None
    kv_layernorm: Optional[Spec] = None


@dataclass
class MLPSubmodules:
    linear_fc1: Optional[Spec] = None
    linear_fc2: Optional[Spec] = None


@dataclass
class MoESubmodules:
    experts: Optional[Spec] = None
    shared_experts: Optional[Spec] = None


@dataclass
class TransformerLayerSubmodules:
    input_layernorm: Spec = IdentityOp
    self_attention: Spec = IdentityOp
    self_attn_bda: Spec = IdentityFuncOp
    pre_cross_attn_layernorm: Spec = IdentityOp
    cross_attention: Spec = IdentityOp
    cross_attn_bda: Spec = IdentityFuncOp
    pre_mlp_layernorm: Spec = IdentityOp
    mlp: Spec = IdentityOp
    mlp_bda: Spec = IdentityFuncOp
    sharded_state_dict_keys_map: dict = field(default_factory=dict)


@dataclass
class TransformerBlockSubmodules:
    layer_specs: Optional[List[Any]] = None
    layer_norm: Optional[Spec] = None
