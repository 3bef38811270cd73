"""Hugging Face ``config.json`` -> the Megatron command-line flags of the same GPT model.

The flags mirror ``megatron.core.models.gpt.hf_mapping.gpt_kwargs_from_hf_config``: the
model built from them is the one the exact weight mapping expects. The vocabulary comes
through the NullTokenizer with ``--make-vocab-size-divisible-by 1``, so the padded vocabulary
is exactly the HF one and the embedding loads without trimming or padding.
"""

from __future__ import annotations

from typing import List

from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config
from megatron.core.transformer.activations import quick_gelu


def _number(value) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _rotary_base(theta: float) -> str:
    # --rotary-base is an integer flag, as in Megatron.
    if not float(theta).is_integer():
        raise ValueError(f"HF rope_theta {theta} is not an integer; --rotary-base takes integers only")
    return str(int(theta))


def _pattern(freq) -> str:
    return str(freq) if isinstance(freq, int) else "[" + ",".join(str(int(x)) for x in freq) + "]"


def model_flags_from_hf_config(hf_config: dict) -> List[str]:
    """The model-shape flags (no parallelism, tokenizer or run flags) of an HF config."""
    arch, config, model = gpt_kwargs_from_hf_config(hf_config)
    flags = [
        "--num-layers", str(config["num_layers"]),
        "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(config["num_attention_heads"]),
        "--ffn-hidden-size", str(config["ffn_hidden_size"]),
        "--max-position-embeddings", str(model["max_sequence_length"]),
        "--seq-length", str(model["max_sequence_length"]),
        "--norm-epsilon", _number(config["layernorm_epsilon"]),
        "--normalization", config["normalization"],
        "--position-embedding-type", model["position_embedding_type"],
        "--hidden-dropout", _number(config["hidden_dropout"]),
        "--attention-dropout", _number(config["attention_dropout"]),
    ]
    if not model["share_embeddings_and_output_weights"]:
        flags.append("--untie-embeddings-and-output-weights")
    if config.get("openai_gelu"):
        flags.append("--openai-gelu")
    if config.get("bias_activation_fusion") is False:
        flags.append("--no-bias-gelu-fusion")  # exact GeLU; the fused one is the tanh approximation
    if config.get("gated_linear_unit"):
        flags += _gated_unit_flags(config)
    if not config.get("add_bias_linear", True):
        flags.append("--disable-bias-linear")
    if config.get("add_qkv_bias") and not config.get("add_bias_linear", True):
        flags.append("--add-qkv-bias")
    if arch == "deepseek_v3":
        flags += _mla_flags(config) + ["--kv-channels", str(config["kv_channels"]),
                                       "--rotary-base", _rotary_base(model["rotary_base"])]
    elif arch != "gpt2":
        flags += ["--group-query-attention", "--num-query-groups", str(config["num_query_groups"]),
                  "--kv-channels", str(config["kv_channels"]), "--rotary-base", _rotary_base(model["rotary_base"])]
    if model.get("rope_scaling"):
        flags += ["--use-rope-scaling", "--rope-scaling-factor", _number(model["rope_scaling_factor"])]
    if config.get("window_size"):
        left, right = config["window_size"]
        flags += ["--window-size", f"{left},{right}"]
    if config.get("window_attn_skip_freq") is not None:
        flags += ["--window-attn-skip-freq", _pattern(config["window_attn_skip_freq"])]
    if config.get("softmax_type", "vanilla") != "vanilla":
        flags += ["--softmax-type", config["softmax_type"]]
    if config.get("qk_layernorm"):
        flags.append("--qk-layernorm")
    if config.get("num_moe_experts"):
        flags += ["--num-experts", str(config["num_moe_experts"]),
                  "--moe-ffn-hidden-size", str(config["moe_ffn_hidden_size"]),
                  "--moe-router-topk", str(config["moe_router_topk"]),
                  "--moe-layer-freq", _pattern(config["moe_layer_freq"]),
                  "--moe-aux-loss-coeff", _number(config["moe_aux_loss_coeff"])]
        if config.get("moe_router_pre_softmax"):
            flags.append("--moe-router-pre-softmax")
        if config.get("moe_shared_expert_intermediate_size"):
            flags += ["--moe-shared-expert-intermediate-size", str(config["moe_shared_expert_intermediate_size"])]
        if config.get("moe_shared_expert_gate"):
            flags.append("--moe-shared-expert-gate")
        flags += _router_flags(config)
    return flags


def _gated_unit_flags(config: dict) -> List[str]:
    """--swiglu, or gpt-oss's clamped quick-GeLU unit with its +1 linear offset."""
    if config.get("activation_func") is not quick_gelu:
        return ["--swiglu"]
    flags = ["--quick-geglu"]
    if config.get("glu_linear_offset"):
        flags += ["--glu-linear-offset", _number(config["glu_linear_offset"])]
    if config.get("activation_func_clamp_value") is not None:
        flags += ["--activation-func-clamp-value", _number(config["activation_func_clamp_value"])]
    return flags


def _mla_flags(config: dict) -> List[str]:
    flags = ["--multi-latent-attention", "--kv-lora-rank", str(config["kv_lora_rank"]),
             "--qk-head-dim", str(config["qk_head_dim"]), "--qk-pos-emb-head-dim", str(config["qk_pos_emb_head_dim"]),
             "--v-head-dim", str(config["v_head_dim"])]
    if config.get("q_lora_rank") is not None:
        flags += ["--q-lora-rank", str(config["q_lora_rank"])]
    flags += ["--rope-type", config["rope_type"]]
    if config["rope_type"] == "yarn":
        flags += ["--rotary-scaling-factor", _number(config["rotary_scaling_factor"]),
                  "--mscale", _number(config["mscale"]), "--mscale-all-dim", _number(config["mscale_all_dim"]),
                  "--yarn-original-max-position-embeddings", str(config["yarn_original_max_position_embeddings"]),
                  "--yarn-beta-fast", _number(config["yarn_beta_fast"]),
                  "--yarn-beta-slow", _number(config["yarn_beta_slow"])]
        if not config["yarn_correction_range_round_to_int"]:
            flags.append("--no-yarn-correction-range-round-to-int")
    return flags


def _router_flags(config: dict) -> List[str]:
    """DeepSeek's router: sigmoid scores with an expert bias, group-limited, scaled."""
    flags = []
    if config.get("moe_router_score_function", "softmax") != "softmax":
        flags += ["--moe-router-score-function", config["moe_router_score_function"]]
    if config.get("moe_router_enable_expert_bias"):
        flags.append("--moe-router-enable-expert-bias")
    if config.get("moe_router_topk_scaling_factor"):
        flags += ["--moe-router-topk-scaling-factor", _number(config["moe_router_topk_scaling_factor"])]
    if config.get("moe_router_num_groups"):
        flags += ["--moe-router-num-groups", str(config["moe_router_num_groups"]),
                  "--moe-router-group-topk", str(config["moe_router_group_topk"])]
    return flags


def tokenizer_flags_from_hf_config(hf_config: dict) -> List[str]:
    """A NullTokenizer of the HF vocabulary size, unpadded at TP=1."""
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(hf_config["vocab_size"]),
            "--make-vocab-size-divisible-by", "1"]
