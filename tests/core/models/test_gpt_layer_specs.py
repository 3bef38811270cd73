"""Megatron-Core's GPT layer specs name our layers, and GPTModel refuses a spec that asks for
something its config does not build instead of ignoring it."""

import pytest
import torch

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_mlp_module_spec,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.layer_submodules import TransformerBlockSubmodules
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import RMSNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


def _config(**kwargs):
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **kwargs)


def _model(spec, config=None):
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    return GPTModel(config or _config(), spec, vocab_size=64, max_sequence_length=16)


def test_local_spec_names_our_layers():
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    assert spec.module is TransformerLayer
    attention = spec.submodules.self_attention
    assert attention.module is SelfAttention and attention.submodules.q_layernorm is RMSNorm
    assert spec.submodules.mlp.module is MLP
    assert get_gpt_layer_local_spec().submodules.self_attention.submodules.k_layernorm is IdentityOp
    moe = get_mlp_module_spec(num_experts=4, moe_grouped_gemm=True)
    assert moe.module is MoELayer and moe.submodules.experts.module is GroupedMLP
    assert get_mlp_module_spec(num_experts=4).submodules.experts.module is SequentialMLP
    assert get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True) == get_gpt_layer_local_spec(qk_layernorm=True)
    assert get_gpt_layer_local_spec(multi_latent_attention=True).submodules.self_attention.module is MLASelfAttention


def test_gpt_model_accepts_matching_specs_and_runs():
    model = _model(get_gpt_layer_local_spec())
    logits = model(torch.randint(0, 64, (2, 8)), None, None)
    assert logits.shape == (2, 8, 64)
    _model(get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True), _config(qk_layernorm=True))
    _model(ModuleSpec(module=TransformerLayer, submodules=TransformerBlockSubmodules(
        layer_specs=[get_gpt_layer_local_spec()] * 2)))


class _Unknown(torch.nn.Module):
    pass


def test_gpt_model_refuses_specs_it_cannot_build():
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = _Unknown
    with pytest.raises(ValueError, match="core_attention asks for .*_Unknown"):
        _model(spec)
    spec = get_gpt_layer_local_spec()
    spec.submodules.mlp = ModuleSpec(module=("no_such_package.layers", "Linear"))
    with pytest.raises(ValueError, match="cannot be imported"):
        _model(spec)
    with pytest.raises(ValueError, match="q/k layernorm"):
        _model(get_gpt_layer_local_spec(qk_layernorm=True))
    with pytest.raises(ValueError, match="MoE"):
        _model(get_gpt_layer_local_spec(num_experts=4))
    with pytest.raises(ValueError, match="asks for RMSNorm"):
        _model(get_gpt_layer_local_spec(normalization="RMSNorm"))


def test_default_norm_follows_the_config():
    _model(get_gpt_layer_local_spec(), _config(normalization="RMSNorm"))
    _model(get_gpt_layer_local_spec(normalization="RMSNorm"), _config(normalization="RMSNorm"))
    norm = build_module(get_gpt_layer_local_spec().submodules.input_layernorm, _config(normalization="RMSNorm"), 32)
    assert isinstance(norm, RMSNorm)
