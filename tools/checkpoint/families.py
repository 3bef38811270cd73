"""Model families the converter knows: for each --model-type, how to build its model in a
worker, the Megatron flags of a Hugging Face config, and the exact weight mappings.

A new family (BERT, T5, Mamba) plugs in by adding a ``Family`` to ``FAMILIES``.
"""

from __future__ import annotations

# ``args`` here is the namespace saved in the checkpoint, which Megatron-LM or an older release
# may have written without flags added since: getattr with the parser's default stays.

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from workers import ConversionError


@dataclass(frozen=True)
class Family:
    name: str
    model_provider: str  # "module:function", called by the workers
    hf_flags: Optional[Callable[[dict], List[str]]]  # HF config -> Megatron model flags
    hf_to_core: Optional[Callable[[Dict[str, torch.Tensor], dict], Dict[str, torch.Tensor]]]
    # (core state dict, run args, forced HF model type, dtype, vocab) -> (HF state dict, config.json)
    core_to_hf: Optional[Callable[..., Tuple[Dict[str, torch.Tensor], dict]]]
    # (HF directory, run args): writes the tokenizer files of an export, if the family has any
    write_tokenizer: Optional[Callable[[str, object], None]] = None


def _gpt_hf_flags(hf_config: dict) -> List[str]:
    from hf_args import model_flags_from_hf_config, tokenizer_flags_from_hf_config

    return model_flags_from_hf_config(hf_config) + tokenizer_flags_from_hf_config(hf_config)


def _gpt_hf_to_core(weights: Dict[str, torch.Tensor], hf_config: dict) -> Dict[str, torch.Tensor]:
    from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config, hf_to_megatron, shape_from_kwargs

    arch, config_kwargs, model_kwargs = gpt_kwargs_from_hf_config(hf_config)
    return hf_to_megatron(weights, arch, shape_from_kwargs(config_kwargs, model_kwargs))


def _gpt_core_to_hf(state_dict: Dict[str, torch.Tensor], args, hf_model_type: Optional[str], dtype: torch.dtype,
                    vocab_size: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    from hf_config import hf_config_from_args
    from megatron.core.models.gpt.hf_mapping import GPTShape, megatron_to_hf

    config = hf_config_from_args(args, vocab_size, dtype, hf_model_type)
    shape = GPTShape(
        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        kv_channels=args.kv_channels, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        num_moe_experts=args.num_experts or 0, moe_layers=_moe_layers(args),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        multi_latent_attention=bool(getattr(args, "multi_latent_attention", False)),
        q_lora_rank=getattr(args, "q_lora_rank", None),
        gpt_oss=config["model_type"] == "gpt_oss",
    )
    # experts as HF checkpoint files hold them (what save_pretrained writes, every reader loads)
    weights = megatron_to_hf(state_dict, config["model_type"], shape, expert_layout="files")
    if shape.share_embeddings_and_output_weights:
        # transformers ties lm_head to the embedding on load and does not store it.
        weights.pop("lm_head.weight", None)
    return {k: v.to(dtype) for k, v in weights.items()}, config


def _moe_layers(args) -> Tuple[bool, ...]:
    if not getattr(args, "num_experts", None):
        return ()
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    return tuple(bool(x) for x in moe_layer_pattern(args.num_layers, args.moe_layer_freq))


GPT = Family("GPT", "pretrain_gpt:model_provider", _gpt_hf_flags, _gpt_hf_to_core, _gpt_core_to_hf)


def _mamba() -> Family:
    from family_mamba import mamba_core_to_hf, mamba_hf_flags, mamba_hf_to_core

    return Family("Mamba", "pretrain_hybrid:model_provider", mamba_hf_flags, mamba_hf_to_core, mamba_core_to_hf)


def _bert() -> Family:
    from bert_family import bert_core_to_hf, bert_hf_flags, bert_hf_to_core, write_bert_tokenizer

    return Family("BERT", "bert_family:model_provider", bert_hf_flags, bert_hf_to_core, bert_core_to_hf,
                  write_bert_tokenizer)


FAMILIES: Dict[str, Family] = {"GPT": GPT, "BERT": _bert(), "Mamba": _mamba()}
PLANNED = ("T5", "Retro")


def family(model_type: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in PLANNED:
        raise ConversionError(f"--model-type {model_type} is not supported yet; supported: {', '.join(FAMILIES)}")
    raise ConversionError(f"--model-type {model_type}: unknown; supported: {', '.join(FAMILIES)}")
