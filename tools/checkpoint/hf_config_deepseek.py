"""Megatron run arguments with --multi-latent-attention -> a Hugging Face DeepSeek-V3
``config.json`` (``DeepseekV3ForCausalLM``), the inverse of ``hf_mapping_deepseek``.

``args`` is the namespace saved in the checkpoint: getattr keeps the parser's default for
flags an older run did not have.
"""

from __future__ import annotations

from workers import ConversionError

FAMILY = "deepseek_v3"


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ConversionError(f"the checkpoint does not fit the Hugging Face {FAMILY} family: {what}")


def _moe(args) -> dict:
    from megatron.core.transformer.moe.moe_layer_pattern import moe_layer_pattern

    pattern = [int(x) for x in moe_layer_pattern(args.num_layers, args.moe_layer_freq)]
    dense = pattern.index(1) if 1 in pattern else args.num_layers
    _require(pattern == [0] * dense + [1] * (args.num_layers - dense),
             "its dense layers must come first (HF's first_k_dense_replace), then only MoE layers")
    shared = getattr(args, "moe_shared_expert_intermediate_size", None) or 0
    moe_ffn = args.moe_ffn_hidden_size
    _require(shared > 0 and shared % moe_ffn == 0 and not getattr(args, "moe_shared_expert_gate", False),
             "needs ungated shared experts whose width is a multiple of --moe-ffn-hidden-size")
    _require(getattr(args, "moe_router_score_function", "softmax") == "sigmoid"
             and getattr(args, "moe_router_enable_expert_bias", False),
             "needs --moe-router-score-function sigmoid with --moe-router-enable-expert-bias")
    topk = args.moe_router_topk
    groups = getattr(args, "moe_router_num_groups", None) or 1
    group_topk = getattr(args, "moe_router_group_topk", None) or 1
    _require(groups == 1 or topk // group_topk == 2,
             "HF ranks expert groups by their best 2 experts: needs --moe-router-topk / --moe-router-group-topk = 2")
    return {
        "first_k_dense_replace": dense, "n_routed_experts": args.num_experts, "moe_intermediate_size": moe_ffn,
        "n_shared_experts": shared // moe_ffn, "num_experts_per_tok": topk, "norm_topk_prob": True,
        "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
        "n_group": groups, "topk_group": group_topk,
    }


def _rope(args) -> dict:
    """HF rope_parameters: default RoPE, or YaRN when MLA's rope is YaRN with a factor above 1."""
    factor = float(getattr(args, "rotary_scaling_factor", 1.0) or 1.0)
    theta = float(args.rotary_base)
    if getattr(args, "rope_type", None) == "rope" or factor == 1.0:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    mscale, mscale_all_dim = float(args.mscale), float(args.mscale_all_dim)
    _require(bool(mscale) == bool(mscale_all_dim) or (mscale == 1.0 and not mscale_all_dim),
             "HF YaRN needs both --mscale and --mscale-all-dim, or --mscale 1 without --mscale-all-dim")
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
              "original_max_position_embeddings": getattr(args, "yarn_original_max_position_embeddings", None) or 4096,
              "beta_fast": float(getattr(args, "yarn_beta_fast", None) or 32.0),
              "beta_slow": float(getattr(args, "yarn_beta_slow", None) or 1.0),
              "truncate": getattr(args, "yarn_correction_range_round_to_int", None) is not False}
    if mscale_all_dim:
        params.update(mscale=mscale, mscale_all_dim=mscale_all_dim)
    return {"rope_parameters": params}


def deepseek_config(args, vocab: int) -> dict:
    """The DeepSeek-V3 config fields (no model_type / architectures / dtype) of ``args``."""
    _require(args.swiglu and args.normalization == "RMSNorm" and args.position_embedding_type == "rope"
             and not args.add_bias_linear and args.qk_layernorm,
             "needs --swiglu, RMSNorm, RoPE, --disable-bias-linear and --qk-layernorm (the latent norms)")
    _require(getattr(args, "rotary_percent", 1.0) == 1.0 and not getattr(args, "rotary_interleaved", False),
             "needs full, non-interleaved RoPE")
    _require(float(args.norm_epsilon) == 1e-6, "HF fixes the latent norms' eps at 1e-6: needs --norm-epsilon 1e-6")
    _require(not args.group_query_attention or args.num_query_groups == args.num_attention_heads,
             "has no grouped-query attention")
    config = {
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size, "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads, "vocab_size": vocab,
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": float(args.norm_epsilon),
        "rope_interleave": True, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": args.attention_dropout,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "q_lora_rank": args.q_lora_rank, "kv_lora_rank": args.kv_lora_rank, "qk_nope_head_dim": args.qk_head_dim,
        "qk_rope_head_dim": args.qk_pos_emb_head_dim, "v_head_dim": args.v_head_dim,
    }
    config.update(_rope(args))
    if getattr(args, "num_experts", None):
        config.update(_moe(args))
    else:
        config["first_k_dense_replace"] = args.num_layers
    return config
