"""Checks a Megatron-Core layer spec passed to GPTModel against what the config builds.

GPTModel builds its layers from the ``TransformerConfig`` (the local PyTorch modules). A
spec is accepted when every module it names is one of those layers (or an identity
placeholder) and it agrees with the config on MoE, grouped GEMM and q/k layernorm; anything
else (an unknown class, Transformer Engine modules, a spec asking for q/k norms the config
does not turn on) raises ValueError instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Tuple

from megatron.core.fusions.fused_bias_dropout_add import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.layer_submodules import TransformerBlockSubmodules
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, ReplicatedLinear
from megatron.core.transformer.spec_utils import ModuleSpec, get_module
from megatron.core.transformer.torch_norm import L2Norm, LayerNorm, RMSNorm, WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer

_BUILDABLE = (
    TransformerLayer, SelfAttention, DotProductAttention, ColumnParallelLinear, RowParallelLinear,
    MLP, MoELayer, SequentialMLP, GroupedMLP, SharedExpertMLP, LayerNorm, RMSNorm, WrappedTorchNorm, L2Norm,
    IdentityOp, IdentityFuncOp, get_bias_dropout_add, MLASelfAttention, ReplicatedLinear,
)
_HOW_TO = "build the spec with megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec"


def _resolve(spec, where: str):
    try:
        return get_module(spec)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        raise ValueError(f"transformer_layer_spec: {where} names a module that cannot be imported ({error}); {_HOW_TO}") from error


def _walk(spec, where: str) -> Iterator[Tuple[str, object]]:
    """(path, resolved module) for ``spec`` and everything under its submodules."""
    if spec is None:
        return
    yield where, _resolve(spec, where)
    submodules = spec.submodules if isinstance(spec, ModuleSpec) else None
    if submodules is None:
        return
    if not dataclasses.is_dataclass(submodules):
        raise ValueError(f"transformer_layer_spec: {where}.submodules must be a submodules dataclass, got {type(submodules).__name__}")
    for item in dataclasses.fields(submodules):
        value = getattr(submodules, item.name)
        if isinstance(value, dict):
            continue
        yield from _walk(value, f"{where}.{item.name}")


def _modules(spec) -> dict:
    found = {}
    for path, module in _walk(spec, "layer"):
        if module not in _BUILDABLE:
            name = getattr(module, "__qualname__", repr(module))
            raise ValueError(
                f"transformer_layer_spec: {path} asks for {name}, which this package cannot build "
                f"(its layers are the local PyTorch ones); {_HOW_TO}"
            )
        found[path] = module
    return found


def _check_norms(found: dict, config) -> None:
    wanted = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}.get(config.normalization)
    for path, module in found.items():
        if module in (LayerNorm, RMSNorm) and module is not wanted:
            raise ValueError(
                f"transformer_layer_spec: {path} asks for {module.__name__} but config.normalization is "
                f"{config.normalization!r}; pass normalization=config.normalization (or None) to the spec function"
            )


def _check_layer(spec, config) -> None:
    found = _modules(spec)
    _check_norms(found, config)
    if found.get("layer") is not TransformerLayer:
        raise ValueError(f"transformer_layer_spec must describe a TransformerLayer, got {found.get('layer')!r}; {_HOW_TO}")
    mlp = found.get("layer.mlp")
    if (mlp is MoELayer) != (config.num_moe_experts is not None):
        raise ValueError(
            f"transformer_layer_spec and config disagree on MoE: the spec's MLP is {getattr(mlp, '__name__', mlp)}, "
            f"config.num_moe_experts={config.num_moe_experts}; pass num_experts=config.num_moe_experts to the spec function"
        )
    experts = found.get("layer.mlp.experts")
    if experts is not None and (experts is GroupedMLP) != bool(config.moe_grouped_gemm):
        raise ValueError(
            f"transformer_layer_spec asks for {experts.__name__} experts but config.moe_grouped_gemm="
            f"{config.moe_grouped_gemm}; pass moe_grouped_gemm=config.moe_grouped_gemm to the spec function"
        )
    attention = found.get("layer.self_attention")
    if attention is not None and (attention is MLASelfAttention) != bool(config.multi_latent_attention):
        raise ValueError(
            f"transformer_layer_spec asks for {attention.__name__} but config.multi_latent_attention="
            f"{config.multi_latent_attention}; pass multi_latent_attention=config.multi_latent_attention to the spec function"
        )
    q_norm = found.get("layer.self_attention.q_layernorm", IdentityOp)
    if (q_norm is L2Norm) != bool(getattr(config, "qk_l2_norm", False)):
        raise ValueError(
            f"transformer_layer_spec and config disagree on the q/k L2 norm (config.qk_l2_norm={config.qk_l2_norm}); "
            "pass qk_l2_norm=config.qk_l2_norm to the spec function"
        )
    if q_norm is not L2Norm and (q_norm not in (IdentityOp, None)) != bool(config.qk_layernorm):
        raise ValueError(
            f"transformer_layer_spec and config disagree on q/k layernorm (config.qk_layernorm={config.qk_layernorm}); "
            "pass qk_layernorm=config.qk_layernorm to the spec function"
        )


def check_layer_spec(spec, config) -> None:
    """Raise ValueError unless ``spec`` (a layer ModuleSpec, or block submodules holding
    layer specs) asks only for what ``config`` builds; None passes."""
    if spec is None:
        return
    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        spec = spec.submodules
    if isinstance(spec, TransformerBlockSubmodules):
        for layer_spec in spec.layer_specs or []:
            _check_layer(layer_spec, config)
        return
    if not isinstance(spec, ModuleSpec):
        raise ValueError(f"transformer_layer_spec must be a ModuleSpec, got {type(spec).__name__}; {_HOW_TO}")
    _check_layer(spec, config)
