"""Megatron run arguments of a gpt-oss model -> a Hugging Face ``config.json``
(``GptOssForCausalLM``), the inverse of ``hf_mapping_gpt_oss``.

``args`` is the namespace saved in the checkpoint: getattr keeps the parser's default for
flags an older run did not have.
"""

from __future__ import annotations

from workers import ConversionError

FAMILY = "gpt_oss"


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ConversionError(f"the checkpoint does not fit the Hugging Face {FAMILY} family: {what}")


def is_gpt_oss(args) -> bool:
    """gpt-oss's signature: MoE with the clamped quick-GeGLU and attention sinks."""
    return bool(getattr(args, "num_experts", None) and getattr(args, "quick_geglu", False)
                and getattr(args, "softmax_type", "vanilla") == "learnable")


def _layer_types(args) -> list:
    if getattr(args, "window_size", None) is None:
        return ["full_attention"] * args.num_layers
    freq = getattr(args, "window_attn_skip_freq", None)
    if freq is None:
        slides = [True] * args.num_layers
    elif isinstance(freq, int):
        slides = [(i + 1) % freq != 0 for i in range(args.num_layers)]
    else:
        slides = [bool(x) for x in freq]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def gpt_oss_config(args, vocab: int) -> dict:
    """The config.json body (without model_type / architectures / dtype)."""
    _require(is_gpt_oss(args) and args.normalization == "RMSNorm" and args.position_embedding_type == "rope"
             and args.add_bias_linear, "needs --num-experts, --quick-geglu, --softmax-type learnable, RMSNorm, "
             "RoPE and linear biases")
    _require(getattr(args, "glu_linear_offset", 0.0) == 1.0 and getattr(args, "activation_func_clamp_value", None),
             "needs --glu-linear-offset 1 and --activation-func-clamp-value")
    _require(args.moe_layer_freq == 1 and not args.moe_router_pre_softmax
             and not getattr(args, "moe_shared_expert_intermediate_size", None) and not args.qk_layernorm,
             "needs every layer MoE, top-k-then-softmax routing, no shared expert and no --qk-layernorm")
    _require(getattr(args, "rotary_percent", 1.0) == 1.0 and not getattr(args, "rotary_interleaved", False)
             and not getattr(args, "use_rope_scaling", False), "needs full, non-interleaved, unscaled RoPE")
    window = getattr(args, "window_size", None)
    _require(window is None or window[1] == 0, "needs a causal window (--window-size W,0)")
    config = {
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        "head_dim": args.kv_channels, "intermediate_size": args.moe_ffn_hidden_size,
        "max_position_embeddings": args.max_position_embeddings, "vocab_size": vocab,
        "rms_norm_eps": args.norm_epsilon, "attention_bias": True, "attention_dropout": args.attention_dropout,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rotary_base)},
        "num_local_experts": args.num_experts, "num_experts_per_tok": args.moe_router_topk,
        "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
        "swiglu_limit": float(args.activation_func_clamp_value),
        "layer_types": _layer_types(args), "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
    }
    if window is not None:
        config["sliding_window"] = int(window[0]) + 1
    return config
