"""Exact conversion between Hugging Face BERT state dicts and BertModel's (TP=1).

Supported architectures: ``BertForPreTraining`` (pooler, MLM and NSP heads),
``BertForMaskedLM`` (MLM head, no pooler) and ``BertModel`` (pooler, no heads). Pure tensor
shuffling; nothing here imports transformers. ``hf_to_megatron`` followed by
``megatron_to_hf`` returns equal tensors under the same keys.

Layout facts the conversion relies on:
- Hugging Face BERT is post-LayerNorm: the model must be built with
  ``transformer_block_type='post_ln'``; the embedding LayerNorm is the encoder's
  ``initial_layernorm``, each layer's two LayerNorms are ``post_att_layernorm`` and
  ``post_mlp_layernorm``, and there is no final norm.
- q, k, v are separate in HF; Megatron fuses them per head (``gpt.hf_mapping.fuse_qkv``).
- The MLM decoder weight is the word embedding (tied) and its bias is
  ``cls.predictions.bias``; both also appear in ``state_dict()`` as
  ``cls.predictions.decoder.{weight,bias}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from megatron.core.models.gpt.hf_mapping import GPTShape, fuse_qkv, split_qkv

ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "BertModel")
_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclass(frozen=True)
class BertShape:
    """What the conversion needs to know: the shape and which heads exist."""

    num_layers: int
    num_attention_heads: int
    kv_channels: int
    add_pooler: bool
    add_lm_head: bool
    add_binary_head: bool

    @property
    def qkv(self) -> GPTShape:
        heads = self.num_attention_heads
        return GPTShape(self.num_layers, heads, heads, self.kv_channels, True)


def shape_for(arch: str, num_layers: int, num_attention_heads: int, kv_channels: int) -> BertShape:
    """The BertShape of Hugging Face architecture ``arch``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported BERT architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    return BertShape(
        num_layers, num_attention_heads, kv_channels,
        add_pooler=arch != "BertForMaskedLM",
        add_lm_head=arch != "BertModel",
        add_binary_head=arch == "BertForPreTraining",
    )


def bert_kwargs_from_hf_config(c: dict) -> Tuple[str, dict, dict]:
    """(architecture, TransformerConfig kwargs, BertModel kwargs) of an HF BERT config.json."""
    arch = (c.get("architectures") or ["BertForPreTraining"])[0]
    act = c.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"BERT hidden_act {act!r} does not convert: use gelu or gelu_new")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT position_embedding_type {c['position_embedding_type']!r} does not convert: only absolute")
    config = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        ffn_hidden_size=c["intermediate_size"],
        layernorm_epsilon=c.get("layer_norm_eps", 1e-12),
        normalization="LayerNorm",
        add_bias_linear=True,
        openai_gelu=_ACTIVATIONS[act],
        # exact GeLU: the fused bias-GeLU computes the tanh approximation (as Megatron's)
        bias_activation_fusion=_ACTIVATIONS[act],
        hidden_dropout=c.get("hidden_dropout_prob", 0.1),
        attention_dropout=c.get("attention_probs_dropout_prob", 0.1),
        transformer_block_type="post_ln",
    )
    shape = shape_for(arch, 1, 1, 1)
    model = dict(
        vocab_size=c["vocab_size"],
        max_sequence_length=c["max_position_embeddings"],
        num_tokentypes=c.get("type_vocab_size", 2),
        add_binary_head=shape.add_binary_head,
        add_lm_head=shape.add_lm_head,
        add_pooler=shape.add_pooler,
    )
    return arch, config, model


def _prefix(shape: BertShape) -> str:
    # Models with heads keep the encoder under "bert."; the bare BertModel has no prefix.
    return "bert." if (shape.add_lm_head or shape.add_binary_head) else ""


def _pairs(shape: BertShape):
    """(HF name, Megatron name) of every tensor that maps one to one."""
    b = _prefix(shape)
    pairs = [
        (f"{b}embeddings.word_embeddings.weight", "embedding.word_embeddings.weight"),
        (f"{b}embeddings.position_embeddings.weight", "embedding.position_embeddings.weight"),
        (f"{b}embeddings.token_type_embeddings.weight", "embedding.tokentype_embeddings.weight"),
        (f"{b}embeddings.LayerNorm.weight", "encoder.initial_layernorm.weight"),
        (f"{b}embeddings.LayerNorm.bias", "encoder.initial_layernorm.bias"),
    ]
    for i in range(shape.num_layers):
        h, m = f"{b}encoder.layer.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            pairs += [
                (f"{h}attention.output.dense.{p}", f"{m}self_attention.linear_proj.{p}"),
                (f"{h}attention.output.LayerNorm.{p}", f"{m}post_att_layernorm.{p}"),
                (f"{h}intermediate.dense.{p}", f"{m}mlp.linear_fc1.{p}"),
                (f"{h}output.dense.{p}", f"{m}mlp.linear_fc2.{p}"),
                (f"{h}output.LayerNorm.{p}", f"{m}post_mlp_layernorm.{p}"),
            ]
    for p in ("weight", "bias"):
        if shape.add_pooler:
            pairs.append((f"{b}pooler.dense.{p}", f"pooler.dense.{p}"))
        if shape.add_lm_head:
            pairs += [
                (f"cls.predictions.transform.dense.{p}", f"lm_head.dense.{p}"),
                (f"cls.predictions.transform.LayerNorm.{p}", f"lm_head.layer_norm.{p}"),
            ]
        if shape.add_binary_head:
            pairs.append((f"cls.seq_relationship.{p}", f"binary_head.{p}"))
    if shape.add_lm_head:
        pairs.append(("cls.predictions.bias", "output_layer.bias"))
    return pairs


def _take(sd: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"state dict has no {key!r}: is the model shape / architecture right?")
    return sd.pop(key)


def _finish(sd: Dict[str, torch.Tensor], ignored: Tuple[str, ...]) -> None:
    left = sorted(k for k in sd if k not in ignored and not k.endswith("._extra_state"))
    if left:
        raise ValueError(f"unconverted keys (the shape or architecture does not match): {left[:8]}")


def hf_to_megatron(hf_state_dict: Dict[str, torch.Tensor], shape: BertShape) -> Dict[str, torch.Tensor]:
    """HF BERT state dict -> BertModel (post_ln) state dict."""
    sd = dict(hf_state_dict)
    out = {m: _take(sd, h) for h, m in _pairs(shape)}
    b = _prefix(shape)
    for i in range(shape.num_layers):
        h, m = f"{b}encoder.layer.{i}.attention.self.", f"encoder.layers.{i}.self_attention.linear_qkv."
        for p in ("weight", "bias"):
            q, k, v = (_take(sd, f"{h}{name}.{p}") for name in ("query", "key", "value"))
            out[f"{m}{p}"] = fuse_qkv(q, k, v, shape.qkv)
    # Tied copies and buffers that carry no weights of their own.
    ignored = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
               f"{b}embeddings.position_ids", f"{b}embeddings.token_type_ids")
    _finish(sd, ignored)
    return out


def megatron_to_hf(state_dict: Dict[str, torch.Tensor], shape: BertShape) -> Dict[str, torch.Tensor]:
    """BertModel (post_ln) state dict -> HF BERT state dict with the keys of the
    architecture's ``state_dict()`` (tied copies included; savers drop them)."""
    if "encoder.initial_layernorm.weight" not in state_dict:
        raise ValueError(
            "only a post-LayerNorm BERT (transformer_block_type post_ln) converts to Hugging Face: "
            "Megatron's pre-LayerNorm BERT has no Hugging Face equivalent"
        )
    sd = dict(state_dict)
    out = {h: _take(sd, m) for h, m in _pairs(shape)}
    b = _prefix(shape)
    for i in range(shape.num_layers):
        h, m = f"{b}encoder.layer.{i}.attention.self.", f"encoder.layers.{i}.self_attention.linear_qkv."
        for p in ("weight", "bias"):
            q, k, v = split_qkv(_take(sd, f"{m}{p}"), shape.qkv)
            out.update({f"{h}query.{p}": q, f"{h}key.{p}": k, f"{h}value.{p}": v})
    if shape.add_lm_head:
        out["cls.predictions.decoder.weight"] = out[f"{b}embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    _finish(sd, ("output_layer.weight",))
    return out
