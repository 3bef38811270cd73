"""Megatron run arguments -> a Hugging Face ``config.json`` of the same GPT model.

The HF family follows from the arguments (``hf_family``) unless forced with
--hf-model-type; the config then holds every field transformers needs to build the model
that ``megatron_to_hf``'s weights fit.
"""

from __future__ import annotations

# ``args`` here is the namespace saved in the checkpoint, which Megatron-LM or an older release
# may have written without flags added since: getattr with the parser's default stays.

from typing import Optional

import torch

from workers import ConversionError

_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
HF_MODEL_TYPES = tuple(_ARCHITECTURES)


def hf_family(args) -> str:
    """The HF model type that matches the saved run's model flags."""
    if getattr(args, "multi_latent_attention", False):
        return "deepseek_v3"
    if getattr(args, "num_experts", None):
        from hf_config_gpt_oss import is_gpt_oss

        if is_gpt_oss(args):
            return "gpt_oss"
        if getattr(args, "moe_shared_expert_gate", False):
            return "qwen2_moe"
        return "qwen3_moe" if getattr(args, "qk_layernorm", False) else "mixtral"
    if args.swiglu and args.normalization == "RMSNorm" and args.position_embedding_type == "rope":
        if getattr(args, "window_size", None):
            return "mistral"
        return "qwen2" if getattr(args, "add_qkv_bias", False) else "llama"
    if args.position_embedding_type == "learned_absolute" and args.normalization == "LayerNorm" and not args.swiglu:
        return "gpt2"
    raise ConversionError(
        f"no Hugging Face family matches this model (--normalization {args.normalization}, --position-embedding-type "
        f"{args.position_embedding_type}, swiglu={args.swiglu}); pass --hf-model-type one of {', '.join(HF_MODEL_TYPES)}")


def _require(condition: bool, family: str, what: str) -> None:
    if not condition:
        raise ConversionError(f"the checkpoint does not fit the Hugging Face {family} family: {what}")


def _tied(args) -> bool:
    return not args.untie_embeddings_and_output_weights


def _gpt2(args, vocab: int) -> dict:
    _require(args.normalization == "LayerNorm" and args.add_bias_linear and not args.swiglu, "gpt2",
             "needs LayerNorm, linear biases and a plain GeLU MLP")
    _require((args.num_query_groups or args.num_attention_heads) == args.num_attention_heads
             or not args.group_query_attention, "gpt2", "has no grouped-query attention")
    _require(args.kv_channels * args.num_attention_heads == args.hidden_size, "gpt2", "needs kv_channels = h / heads")
    return {
        "n_layer": args.num_layers, "n_embd": args.hidden_size, "n_head": args.num_attention_heads,
        "n_inner": args.ffn_hidden_size, "n_positions": args.max_position_embeddings, "vocab_size": vocab,
        "layer_norm_epsilon": args.norm_epsilon,
        "activation_function": "gelu_new" if args.openai_gelu or args.bias_gelu_fusion else "gelu",
        "resid_pdrop": args.hidden_dropout, "embd_pdrop": args.hidden_dropout, "attn_pdrop": args.attention_dropout,
        "tie_word_embeddings": _tied(args),
    }


def _llama_like(args, vocab: int, family: str) -> dict:
    _require(args.swiglu and args.normalization == "RMSNorm" and args.position_embedding_type == "rope"
             and not args.add_bias_linear, family, "needs --swiglu, RMSNorm, RoPE and --disable-bias-linear")
    _require(getattr(args, "rotary_percent", 1.0) == 1.0 and not getattr(args, "rotary_interleaved", False),
             family, "needs full, non-interleaved RoPE")
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    config = {
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads, "num_key_value_heads": groups,
        "head_dim": args.kv_channels, "intermediate_size": args.ffn_hidden_size,
        "max_position_embeddings": args.max_position_embeddings, "vocab_size": vocab,
        "rms_norm_eps": args.norm_epsilon, "rope_theta": float(args.rotary_base), "hidden_act": "silu",
        "attention_dropout": args.attention_dropout, "tie_word_embeddings": _tied(args),
    }
    if family in ("llama",):
        config.update(attention_bias=False, mlp_bias=False)
    if getattr(args, "use_rope_scaling", False):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_theta": float(args.rotary_base)}
    window = getattr(args, "window_size", None)
    if family in ("mistral", "mixtral"):
        config["sliding_window"] = int(window[0]) + 1 if window else None
    else:
        _require(not window, family, "has no sliding window (use --hf-model-type mistral)")
    if family == "qwen2_moe":
        config["qkv_bias"] = bool(getattr(args, "add_qkv_bias", False))
    else:
        _require(bool(getattr(args, "add_qkv_bias", False)) == (family == "qwen2"), family,
                 "q/k/v biases exist only in qwen2 (and optionally qwen2_moe)")
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        config.update(_moe(args, family))
    else:
        _require(not getattr(args, "num_experts", None), family, "is not a mixture of experts")
    return config


def _moe(args, family: str) -> dict:
    freq = args.moe_layer_freq
    config = {"num_experts_per_tok": args.moe_router_topk,
              "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0)}
    if family == "mixtral":
        _require(freq == 1 and not args.moe_router_pre_softmax
                 and not getattr(args, "moe_shared_expert_intermediate_size", None), family,
                 "needs every layer MoE (--moe-layer-freq 1), top-k-then-softmax routing and no shared expert")
        config.update(num_local_experts=args.num_experts, intermediate_size=args.moe_ffn_hidden_size)
        return config
    pattern = [1] * args.num_layers if freq == 1 else (
        [int(i % freq == 0) for i in range(args.num_layers)] if isinstance(freq, int) else list(freq))
    config.update(num_experts=args.num_experts, moe_intermediate_size=args.moe_ffn_hidden_size,
                  norm_topk_prob=not args.moe_router_pre_softmax, decoder_sparse_step=1,
                  mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe], use_sliding_window=False)
    shared = getattr(args, "moe_shared_expert_intermediate_size", None)
    gated = bool(getattr(args, "moe_shared_expert_gate", False))
    if family == "qwen2_moe":
        _require(bool(shared) and gated and not args.qk_layernorm, family,
                 "needs --moe-shared-expert-intermediate-size with --moe-shared-expert-gate, and no --qk-layernorm")
        config["shared_expert_intermediate_size"] = shared
        return config
    _require(args.qk_layernorm and not shared, family, "needs --qk-layernorm and has no shared expert")
    return config


def hf_config_from_args(args, vocab_size: int, dtype: torch.dtype, family: Optional[str] = None) -> dict:
    """The ``config.json`` dict of the HF model equal to the run described by ``args``."""
    family = family or hf_family(args)
    # Only gpt_oss has attention sinks, and none of these families a weightless q/k L2 norm;
    # exporting would silently drop them.
    _require(getattr(args, "softmax_type", "vanilla") == "vanilla" or family == "gpt_oss", family,
             "has only the vanilla softmax")
    _require(not getattr(args, "qk_l2_norm", False), family, "has no q/k L2 norm")
    if family not in _ARCHITECTURES:
        raise ConversionError(f"--hf-model-type {family}: use one of {', '.join(HF_MODEL_TYPES)}")
    if family == "gpt2":
        body = _gpt2(args, vocab_size)
    elif family == "deepseek_v3":
        from hf_config_deepseek import deepseek_config

        body = deepseek_config(args, vocab_size)
    elif family == "gpt_oss":
        from hf_config_gpt_oss import gpt_oss_config

        body = gpt_oss_config(args, vocab_size)
    else:
        _require(not getattr(args, "multi_latent_attention", False), family, "has no multi-latent attention")
        body = _llama_like(args, vocab_size, family)
    body.update(model_type=family, architectures=[_ARCHITECTURES[family]],
                torch_dtype=str(dtype).replace("torch.", ""), dtype=str(dtype).replace("torch.", ""))
    return body
