"""Megatron-Core's GPT layer specs (``get_gpt_layer_local_spec``,
``get_gpt_layer_with_transformer_engine_spec``, ``get_mlp_module_spec``), naming this
package's layers.

Both layer specs name the same local pure-PyTorch modules: there is no Transformer Engine
here, and the local layers already fuse what TE's spec asks for where PyTorch can. GPTModel
builds its layers from the ``TransformerConfig``; it reads a spec to refuse one that asks for
something the config does not build (``spec_check``), so a spec and a config must agree on
MoE (``num_experts`` vs ``num_moe_experts``), ``qk_layernorm`` and ``qk_l2_norm``.
"""

from __future__ import annotations

import logging
from typing import Optional

from megatron.core.fusions.fused_bias_dropout_add import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.layer_submodules import (
    MLPSubmodules,
    MoESubmodules,
    MLASelfAttentionSubmodules,
    SelfAttentionSubmodules,
    TransformerLayerSubmodules,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, ReplicatedLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import L2Norm, LayerNorm, RMSNorm, WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer

logger = logging.getLogger(__name__)

# None follows config.normalization, as Megatron-Core's default norm does.
_NORMS = {None: WrappedTorchNorm, "LayerNorm": LayerNorm, "RMSNorm": RMSNorm}


def _norm_class(normalization: Optional[str]):
    if normalization not in _NORMS:
        raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {normalization!r}")
    return _NORMS[normalization]


def _refuse(name: str, value) -> None:
    if value:
        raise ValueError(f"{name}={value!r} is not supported by the local layers here; leave it at its default")


def get_mlp_module_spec(
    use_te: bool = True,
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    fp8: Optional[str] = None,
    moe_use_legacy_grouped_gemm: bool = False,
) -> ModuleSpec:
    """The MLP spec: a dense ``MLP`` (fc1 column-, fc2 row-parallel), or with ``num_experts``
    a ``MoELayer`` whose experts are ``GroupedMLP`` (``moe_grouped_gemm``) or ``SequentialMLP``.
    ``use_te`` and ``fp8`` select nothing here (one set of layers)."""
    del use_te, fp8, moe_use_legacy_grouped_gemm
    if num_experts is None:
        return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    experts = GroupedMLP if moe_grouped_gemm else SequentialMLP
    expert_mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(module=experts, submodules=expert_mlp)))


def _attention_spec(qk_norm) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _mla_spec(qk_norm) -> ModuleSpec:
    """Megatron's multi-latent attention submodules: the down projections replicated on
    every tensor-parallel rank, the up projections column-parallel."""
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ReplicatedLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ReplicatedLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            kv_layernorm=qk_norm,
        ),
    )


def get_gpt_layer_local_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
    fp8: Optional[str] = None,
    moe_use_legacy_grouped_gemm: bool = False,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    use_kitchen: bool = False,
) -> ModuleSpec:
    """A GPT layer of the local modules: pre-norm self attention (causal) and MLP/MoE,
    each followed by bias-dropout-add; ``multi_latent_attention`` selects MLASelfAttention.
    ``qk_l2_norm`` puts L2Norm in place of the q/k norms, as Megatron-Core does (not with
    multi-latent attention, whose q/kv norms act on the latents). Kitchen layers are refused
    (not built here)."""
    if multi_latent_attention and qk_l2_norm:
        raise ValueError("--qk-l2-norm with --multi-latent-attention is not supported: drop --qk-l2-norm")
    _refuse("use_kitchen", use_kitchen)
    norm = _norm_class(normalization)
    qk_norm = L2Norm if qk_l2_norm else norm if qk_layernorm else IdentityOp
    attention = _mla_spec(qk_norm) if multi_latent_attention else _attention_spec(qk_norm)
    mlp = get_mlp_module_spec(
        use_te=False, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, fp8=fp8,
        moe_use_legacy_grouped_gemm=moe_use_legacy_grouped_gemm,
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_gpt_layer_with_transformer_engine_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
    fp8: Optional[str] = None,
    moe_use_legacy_grouped_gemm: bool = False,
    qk_l2_norm: bool = False,
    use_te_op_fuser: bool = False,
    use_kitchen: bool = False,
    **_ignored,
) -> ModuleSpec:
    """Megatron's Transformer Engine spec, mapped to the same local layers as
    ``get_gpt_layer_local_spec`` (no Transformer Engine here; checkpoints map one to one
    either way)."""
    _refuse("use_te_op_fuser", use_te_op_fuser)
    return get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm,
        multi_latent_attention=multi_latent_attention, fp8=fp8,
        moe_use_legacy_grouped_gemm=moe_use_legacy_grouped_gemm, qk_l2_norm=qk_l2_norm,
        use_kitchen=use_kitchen,
    )
