"""Exact conversion between Hugging Face ``Mamba2ForCausalLM`` state dicts and MambaModel's
(TP=1, pattern of Mamba layers only). Pure tensor renaming: the mixer's parameters have
the same names and layouts on both sides (in_proj rows [z ; x ; B ; C ; dt], conv1d over
[x ; B ; C], groups contiguous), so ``hf_to_megatron`` followed by ``megatron_to_hf``
returns equal tensors under the same keys. Nothing here imports transformers.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

_MIXER_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")


def _layer_pairs(num_layers: int):
    """(HF key, Megatron key) of every per-layer tensor."""
    for i in range(num_layers):
        hf, ours = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        yield hf + "norm.weight", ours + "norm.weight"
        for name in _MIXER_PARAMS:
            yield hf + "mixer." + name, ours + "mixer." + name


def _pairs(num_layers: int, tied: bool):
    yield "backbone.embeddings.weight", "embedding.word_embeddings.weight"
    yield from _layer_pairs(num_layers)
    yield "backbone.norm_f.weight", "decoder.final_norm.weight"
    if not tied:
        yield "lm_head.weight", "output_layer.weight"


def _rename(sd: Dict[str, torch.Tensor], pairs, source: int, what: str) -> Dict[str, torch.Tensor]:
    out = {}
    for pair in pairs:
        if pair[source] not in sd:
            raise KeyError(f"{what} state dict has no {pair[source]!r}: not a Mamba-2 model of this shape")
        out[pair[1 - source]] = sd[pair[source]]
    return out


def hf_to_megatron(hf_state_dict: Dict[str, torch.Tensor], num_layers: int, tied: bool) -> Dict[str, torch.Tensor]:
    """Mamba2ForCausalLM's state dict -> MambaModel's (``lm_head`` dropped when tied)."""
    return _rename(hf_state_dict, _pairs(num_layers, tied), 0, "Hugging Face")


def megatron_to_hf(state_dict: Dict[str, torch.Tensor], num_layers: int, tied: bool) -> Dict[str, torch.Tensor]:
    """MambaModel's state dict -> Mamba2ForCausalLM's (``lm_head`` shares the embedding when tied)."""
    out = _rename(state_dict, _pairs(num_layers, tied), 1, "MambaModel")
    if tied:
        out["lm_head.weight"] = out["backbone.embeddings.weight"]
    return out


def _float(value) -> float:
    """A number of a config dict; transformers writes infinity to JSON as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def mamba_kwargs_from_hf_config(c: dict) -> Tuple[dict, dict, dict]:
    """(TransformerConfig kwargs, MambaConfig kwargs, MambaModel kwargs) of a Mamba2Config dict."""
    for key, supported, why in (("use_bias", False, "projection biases"), ("use_conv_bias", True, "a conv1d without bias"),
                                ("hidden_act", "silu", "a conv activation other than silu"),
                                ("rms_norm", True, "a mixer without gated RMSNorm")):
        if c.get(key, supported) != supported:
            raise ValueError(f"Mamba2 config {key}={c[key]!r}: {why} is not supported")
    layers = c["num_hidden_layers"]
    config_kwargs = dict(
        num_layers=layers, hidden_size=c["hidden_size"], num_attention_heads=1, normalization="RMSNorm",
        layernorm_epsilon=c["layer_norm_epsilon"], add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
    mamba_kwargs = dict(
        mamba_state_dim=c["state_size"], mamba_head_dim=c["head_dim"], mamba_num_groups=c["n_groups"],
        mamba_num_heads=c["num_heads"], expand=c["expand"], d_conv=c["conv_kernel"], chunk_size=c["chunk_size"],
        dt_limit=tuple(_float(x) for x in c.get("time_step_limit", (0.0, float("inf")))),
        norm_eps=c["layer_norm_epsilon"],
    )
    model_kwargs = dict(vocab_size=c["vocab_size"], hybrid_layer_pattern="M" * layers,
                        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
                        position_embedding_type="none")
    return config_kwargs, mamba_kwargs, model_kwargs
