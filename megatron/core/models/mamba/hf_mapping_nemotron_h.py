"""Exact conversion between Hugging Face ``NemotronHForCausalLM`` state dicts and a hybrid
MambaModel's (TP=1). NemotronH is transformers' model of Megatron's hybrid layout: each
layer is ``norm`` + one mixer (Mamba-2, attention, or a squared-ReLU MLP), as one symbol
of the layer pattern.

Per layer, by kind:
  M  norm -> ``norm``; mixer parameters keep their names (as for Mamba2ForCausalLM)
  *  norm -> ``input_layernorm``; q/k/v_proj -> the fused ``self_attention.linear_qkv``
     (Megatron's per-query-group row order); o_proj -> ``self_attention.linear_proj``
  -  norm -> ``pre_mlp_layernorm``; up_proj -> ``mlp.linear_fc1``; down_proj -> ``mlp.linear_fc2``
MoE layers (``E``) are not mapped. Nothing here imports transformers.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from megatron.core.models.gpt.hf_mapping import GPTShape, fuse_qkv, split_qkv
from megatron.core.models.mamba.hf_mapping import _MIXER_PARAMS, _float
from megatron.core.transformer.activations import squared_relu

# transformers 5 names the backbone ``model.`` in memory; checkpoint files name it ``backbone.``.
MODEL_PREFIX, FILE_PREFIX = "model.", "backbone."
_BLOCK_SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}


def _qkv_shape(c: dict) -> GPTShape:
    return GPTShape(num_layers=len(c["layers_block_type"]), num_attention_heads=c["num_attention_heads"],
                    num_query_groups=c["num_key_value_heads"], kv_channels=c["head_dim"],
                    share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)))


def pattern_of(c: dict) -> str:
    """The layer pattern of a NemotronH config (its ``layers_block_type``)."""
    symbols = [_BLOCK_SYMBOL[t] for t in c["layers_block_type"]]
    if "E" in symbols:
        raise ValueError("NemotronH MoE layers are not supported by this mapping")
    return "".join(symbols)


def _simple_pairs(pattern: str, prefix: str):
    """(HF key, Megatron key) of every tensor that is only renamed."""
    for i, symbol in enumerate(pattern):
        hf, ours = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        if symbol == "M":
            yield hf + "norm.weight", ours + "norm.weight"
            for name in _MIXER_PARAMS:
                yield hf + "mixer." + name, ours + "mixer." + name
        elif symbol == "*":
            yield hf + "norm.weight", ours + "input_layernorm.weight"
            yield hf + "mixer.o_proj.weight", ours + "self_attention.linear_proj.weight"
        else:
            yield hf + "norm.weight", ours + "pre_mlp_layernorm.weight"
            yield hf + "mixer.up_proj.weight", ours + "mlp.linear_fc1.weight"
            yield hf + "mixer.down_proj.weight", ours + "mlp.linear_fc2.weight"
    yield f"{prefix}embeddings.weight", "embedding.word_embeddings.weight"
    yield f"{prefix}norm_f.weight", "decoder.final_norm.weight"


def hf_to_megatron(hf_state_dict: Dict[str, torch.Tensor], c: dict) -> Dict[str, torch.Tensor]:
    """NemotronHForCausalLM's state dict (config dict ``c``) -> MambaModel's."""
    pattern, shape = pattern_of(c), _qkv_shape(c)
    prefix = MODEL_PREFIX if f"{MODEL_PREFIX}embeddings.weight" in hf_state_dict else FILE_PREFIX
    out = {ours: hf_state_dict[hf] for hf, ours in _simple_pairs(pattern, prefix)}
    for i, symbol in enumerate(pattern):
        if symbol == "*":
            q, k, v = (hf_state_dict[f"{prefix}layers.{i}.mixer.{n}_proj.weight"] for n in "qkv")
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, shape)
    if not shape.share_embeddings_and_output_weights:
        out["output_layer.weight"] = hf_state_dict["lm_head.weight"]
    return out


def megatron_to_hf(state_dict: Dict[str, torch.Tensor], c: dict, prefix: str = MODEL_PREFIX) -> Dict[str, torch.Tensor]:
    """MambaModel's state dict -> NemotronHForCausalLM's, keys under ``prefix`` (``lm_head``
    shares the embedding when tied)."""
    pattern, shape = pattern_of(c), _qkv_shape(c)
    out = {hf: state_dict[ours] for hf, ours in _simple_pairs(pattern, prefix)}
    for i, symbol in enumerate(pattern):
        if symbol == "*":
            q, k, v = split_qkv(state_dict[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], shape)
            for name, tensor in zip("qkv", (q, k, v)):
                out[f"{prefix}layers.{i}.mixer.{name}_proj.weight"] = tensor
    tied = shape.share_embeddings_and_output_weights
    out["lm_head.weight"] = out[f"{prefix}embeddings.weight"] if tied else state_dict["output_layer.weight"]
    return out


def nemotron_h_kwargs_from_hf_config(c: dict) -> Tuple[dict, dict, dict]:
    """(TransformerConfig kwargs, MambaConfig kwargs, MambaModel kwargs) of a NemotronHConfig dict."""
    for key, supported in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False), ("use_bias", False), ("mamba_proj_bias", False),
                           ("use_conv_bias", True)):
        if c.get(key, supported) != supported:
            raise ValueError(f"NemotronH config {key}={c[key]!r} is not supported (only {supported!r})")
    pattern = pattern_of(c)
    config_kwargs = dict(
        num_layers=len(pattern), hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"], kv_channels=c["head_dim"], ffn_hidden_size=c["intermediate_size"],
        normalization="RMSNorm", layernorm_epsilon=c["layer_norm_epsilon"], add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, activation_func=squared_relu,
    )
    mamba_kwargs = dict(
        mamba_state_dim=c["ssm_state_size"], mamba_head_dim=c["mamba_head_dim"], mamba_num_groups=c["n_groups"],
        mamba_num_heads=c["mamba_num_heads"], d_conv=c["conv_kernel"], chunk_size=c["chunk_size"],
        dt_limit=tuple(_float(x) for x in c.get("time_step_limit", (0.0, float("inf")))),
        norm_eps=c["layer_norm_epsilon"],
    )
    model_kwargs = dict(vocab_size=c["vocab_size"], hybrid_layer_pattern=pattern,
                        max_sequence_length=c["max_position_embeddings"],
                        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
                        position_embedding_type="none")
    return config_kwargs, mamba_kwargs, model_kwargs
