"""The BERT family of the converter: Hugging Face ``BertForPreTraining`` /
``BertForMaskedLM`` / ``BertModel`` import, and export to those, with ``config.json`` and
the WordPiece tokenizer files.

Only the post-LayerNorm layout (--transformer-block-type post_ln) is Hugging Face's BERT;
the mapping itself is ``megatron.core.models.bert.hf_mapping``. A headless ``BertModel``
(a sentence-embedding model, say) imports into a checkpoint of the encoder and the pooler
only: the converter records the architecture in the checkpoint's arguments
(``IMPORTED_ARCHITECTURE``) and builds that model (``model_provider``) whenever it loads
the checkpoint again, to reshard or export it. It has no LM head, so ``pretrain_bert.py``
does not train from it.
"""

from __future__ import annotations

# ``args`` here is the namespace saved in the checkpoint, which Megatron-LM or an older release
# may have written without flags added since: getattr with the parser's default stays.

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from workers import ConversionError

ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "BertModel")
# Tied copies transformers rebuilds on load and does not store.
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_HEAD_PREFIXES = {"lm": ("lm_head.", "output_layer."), "pooler": ("pooler.",), "binary": ("binary_head.",)}


def _number(value) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _arch(hf_config: dict) -> str:
    from megatron.core.models.bert.hf_mapping import bert_kwargs_from_hf_config

    try:
        arch, _, _ = bert_kwargs_from_hf_config(hf_config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if arch not in ARCHITECTURES:
        raise ConversionError(f"--model-type BERT imports {', '.join(ARCHITECTURES)}, not {arch}")
    return arch


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """The model a conversion worker loads or saves: ``pretrain_bert.py``'s, or for an
    imported headless ``BertModel`` the encoder with the pooler and no heads."""
    import pretrain_bert
    from megatron.training import get_args

    provider = pretrain_bert.headless_model_provider if pretrain_bert.imports_headless_bert(get_args()) \
        else pretrain_bert.model_provider
    return provider(pre_process, post_process, vp_stage)


def bert_hf_flags(hf_config: dict) -> List[str]:
    """The Megatron flags of the post-LayerNorm BERT an HF config describes."""
    from megatron.core.models.bert.hf_mapping import bert_kwargs_from_hf_config

    arch = _arch(hf_config)
    _, config, model = bert_kwargs_from_hf_config(hf_config)
    flags = [
        "--num-layers", str(config["num_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(config["num_attention_heads"]),
        "--ffn-hidden-size", str(config["ffn_hidden_size"]),
        "--max-position-embeddings", str(model["max_sequence_length"]),
        "--seq-length", str(model["max_sequence_length"]),
        "--norm-epsilon", _number(config["layernorm_epsilon"]),
        "--hidden-dropout", _number(config["hidden_dropout"]),
        "--attention-dropout", _number(config["attention_dropout"]),
        "--transformer-block-type", "post_ln",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config["vocab_size"]),
        "--make-vocab-size-divisible-by", "1",
    ]
    if model["num_tokentypes"] != 2:
        raise ConversionError(f"BERT type_vocab_size {model['num_tokentypes']} does not convert: only 2")
    if config["openai_gelu"]:
        flags.append("--openai-gelu")
    else:
        flags.append("--no-bias-gelu-fusion")  # exact GeLU; the fused one is the tanh approximation
    if arch != "BertForPreTraining":
        flags.append("--bert-no-binary-head")
    return flags


def _shape(arch: str, args):
    from megatron.core.models.bert.hf_mapping import shape_for

    return shape_for(arch, args.num_layers, args.num_attention_heads, args.kv_channels)


def bert_hf_to_core(weights: Dict[str, torch.Tensor], hf_config: dict) -> Dict[str, torch.Tensor]:
    from megatron.core.models.bert.hf_mapping import hf_to_megatron, shape_for

    arch = _arch(hf_config)
    shape = shape_for(arch, hf_config["num_hidden_layers"], hf_config["num_attention_heads"],
                      hf_config["hidden_size"] // hf_config["num_attention_heads"])
    return hf_to_megatron(weights, shape)


def _drop_heads(state_dict: Dict[str, torch.Tensor], *heads: str) -> Dict[str, torch.Tensor]:
    prefixes = tuple(p for head in heads for p in _HEAD_PREFIXES[head])
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _export_arch(args, hf_model_type: Optional[str], state_dict) -> str:
    if getattr(args, "transformer_block_type", "pre_ln") != "post_ln":
        raise ConversionError(
            "only a post-LayerNorm BERT (--transformer-block-type post_ln) converts to Hugging Face; this "
            "checkpoint is Megatron's pre-LayerNorm BERT, which Hugging Face's BERT cannot express")
    import pretrain_bert

    if pretrain_bert.imports_headless_bert(args):
        default = "BertModel"
    else:
        default = "BertForPreTraining" if args.bert_binary_head else "BertForMaskedLM"
    arch = hf_model_type or default
    if arch not in ARCHITECTURES:
        raise ConversionError(f"--hf-model-type {arch}: a BERT exports as one of {', '.join(ARCHITECTURES)}")
    if arch != "BertModel" and "lm_head.dense.weight" not in state_dict:
        raise ConversionError(f"--hf-model-type {arch} needs the LM head, and this checkpoint was imported from a "
                              "headless Hugging Face BertModel; export BertModel")
    if arch != "BertForMaskedLM" and "pooler.dense.weight" not in state_dict:
        raise ConversionError(f"--hf-model-type {arch} needs the pooler, and this checkpoint was trained "
                              "with --bert-no-binary-head; export BertForMaskedLM")
    return arch


def bert_core_to_hf(state_dict: Dict[str, torch.Tensor], args, hf_model_type: Optional[str], dtype: torch.dtype,
                    vocab_size: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    from megatron.core.models.bert.hf_mapping import megatron_to_hf

    arch = _export_arch(args, hf_model_type, state_dict)
    if arch == "BertModel":
        state_dict = _drop_heads(state_dict, "lm", "binary")
    elif arch == "BertForMaskedLM":
        state_dict = _drop_heads(state_dict, "pooler", "binary")
    weights = megatron_to_hf(state_dict, _shape(arch, args))
    for key in _TIED:
        weights.pop(key, None)
    return {k: v.to(dtype) for k, v in weights.items()}, _config(args, arch, dtype, vocab_size)


def _config(args, arch: str, dtype: torch.dtype, vocab_size: int) -> dict:
    name = str(dtype).replace("torch.", "")
    return {
        "architectures": [arch], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads, "intermediate_size": args.ffn_hidden_size,
        "hidden_act": "gelu_new" if args.openai_gelu or args.bias_gelu_fusion else "gelu",
        "hidden_dropout_prob": args.hidden_dropout, "attention_probs_dropout_prob": args.attention_dropout,
        "max_position_embeddings": args.max_position_embeddings, "type_vocab_size": 2,
        "initializer_range": args.init_method_std, "layer_norm_eps": args.norm_epsilon,
        "pad_token_id": 0, "position_embedding_type": "absolute", "tie_word_embeddings": True,
        "torch_dtype": name, "dtype": name,
    }


def write_bert_tokenizer(save_dir: str, args) -> None:
    """vocab.txt and tokenizer_config.json next to the exported model, when the run used a
    BERT WordPiece vocabulary."""
    kind = getattr(args, "tokenizer_type", None)
    vocab = getattr(args, "vocab_file", None)
    if kind not in ("BertWordPieceLowerCase", "BertWordPieceCase") or not vocab or not os.path.isfile(vocab):
        return
    shutil.copyfile(vocab, os.path.join(save_dir, "vocab.txt"))
    with open(os.path.join(save_dir, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": kind == "BertWordPieceLowerCase",
                   "model_max_length": args.max_position_embeddings}, handle, indent=2)
        handle.write("\n")
