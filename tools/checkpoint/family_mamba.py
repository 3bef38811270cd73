"""--model-type Mamba: Hugging Face import and export of ``Mamba2ForCausalLM`` (Mamba layers
only) and ``NemotronHForCausalLM`` (hybrids of Mamba, attention and squared-ReLU MLP layers),
and resharding of hybrid checkpoints (built by pretrain_hybrid.py's model provider).

Export picks mamba2 for a pattern of Mamba layers only and nemotron_h otherwise
(``--hf-model-type`` chooses explicitly).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from workers import ConversionError

# Mamba-2 has no position limit; the flags need one for the sequence-length checks.
_MAX_POSITIONS = 4096


def _number(value) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def mamba_hf_flags(hf_config: dict) -> List[str]:
    """The Megatron flags of the model a Mamba2 config describes (TP=1)."""
    from hf_args import tokenizer_flags_from_hf_config
    from megatron.core.models.mamba.hf_mapping import mamba_kwargs_from_hf_config

    if hf_config.get("model_type") == "nemotron_h":
        return _nemotron_h_flags(hf_config) + tokenizer_flags_from_hf_config(hf_config)
    if hf_config.get("model_type") != "mamba2":
        raise ConversionError(f"--model-type Mamba imports mamba2 and nemotron_h models, got model_type "
                              f"{hf_config.get('model_type')!r}")
    try:
        config, mamba, model = mamba_kwargs_from_hf_config(hf_config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if mamba["dt_limit"] != (0.0, float("inf")):
        raise ConversionError(f"Mamba2 config time_step_limit {mamba['dt_limit']}: Megatron's flags have no dt "
                              "limit; only the default (0, inf) imports")
    flags = [
        "--num-layers", str(config["num_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", "1", "--normalization", "RMSNorm", "--norm-epsilon", _number(config["layernorm_epsilon"]),
        "--disable-bias-linear", "--position-embedding-type", "none",
        "--max-position-embeddings", str(_MAX_POSITIONS), "--seq-length", str(_MAX_POSITIONS),
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--hybrid-layer-pattern", model["hybrid_layer_pattern"],
        "--mamba-state-dim", str(mamba["mamba_state_dim"]), "--mamba-head-dim", str(mamba["mamba_head_dim"]),
        "--mamba-num-groups", str(mamba["mamba_num_groups"]), "--mamba-num-heads", str(mamba["mamba_num_heads"]),
    ]
    if mamba["d_conv"] != 4 or mamba["mamba_num_heads"] * mamba["mamba_head_dim"] != mamba["expand"] * config["hidden_size"]:
        raise ConversionError(f"Mamba2 config conv_kernel={mamba['d_conv']}, num_heads * head_dim != expand * "
                              "hidden_size: Megatron's mixer has conv kernel 4 and a width of heads * head dim")
    if not model["share_embeddings_and_output_weights"]:
        flags.append("--untie-embeddings-and-output-weights")
    return flags + tokenizer_flags_from_hf_config(hf_config)


def _nemotron_h_flags(hf_config: dict) -> List[str]:
    from megatron.core.models.mamba.hf_mapping_nemotron_h import nemotron_h_kwargs_from_hf_config

    try:
        config, mamba, model = nemotron_h_kwargs_from_hf_config(hf_config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if mamba["dt_limit"] != (0.0, float("inf")) or mamba["d_conv"] != 4:
        raise ConversionError("NemotronH config: only conv_kernel 4 and no time_step_limit map to Megatron's flags")
    seq = str(model["max_sequence_length"])
    flags = [
        "--num-layers", str(config["num_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(config["num_attention_heads"]), "--group-query-attention",
        "--num-query-groups", str(config["num_query_groups"]), "--kv-channels", str(config["kv_channels"]),
        "--ffn-hidden-size", str(config["ffn_hidden_size"]), "--squared-relu",
        "--normalization", "RMSNorm", "--norm-epsilon", _number(config["layernorm_epsilon"]), "--disable-bias-linear",
        "--position-embedding-type", "none", "--max-position-embeddings", seq, "--seq-length", seq,
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--hybrid-layer-pattern", model["hybrid_layer_pattern"],
        "--mamba-state-dim", str(mamba["mamba_state_dim"]), "--mamba-head-dim", str(mamba["mamba_head_dim"]),
        "--mamba-num-groups", str(mamba["mamba_num_groups"]), "--mamba-num-heads", str(mamba["mamba_num_heads"]),
    ]
    if not model["share_embeddings_and_output_weights"]:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def mamba_hf_to_core(weights: Dict[str, torch.Tensor], hf_config: dict) -> Dict[str, torch.Tensor]:
    from megatron.core.models.mamba.hf_mapping import hf_to_megatron

    if hf_config.get("model_type") == "nemotron_h":
        from megatron.core.models.mamba import hf_mapping_nemotron_h

        return hf_mapping_nemotron_h.hf_to_megatron(weights, hf_config)
    return hf_to_megatron(weights, hf_config["num_hidden_layers"], bool(hf_config.get("tie_word_embeddings", False)))


def _pattern(args) -> str:
    from megatron.core.models.mamba.layer_pattern import resolve_layer_pattern

    return resolve_layer_pattern(args.num_layers, args.hybrid_layer_pattern, args.hybrid_attention_ratio,
                                 args.hybrid_mlp_ratio, args.hybrid_override_pattern).replace("|", "")


def _expand(inner: int, hidden: int) -> int:
    if inner % hidden:
        raise ConversionError(f"mixer width {inner} is not a multiple of --hidden-size {hidden}: Mamba2Config "
                              "cannot express it (its width is expand * hidden_size)")
    return inner // hidden


def mamba_core_to_hf(state_dict: Dict[str, torch.Tensor], args, hf_model_type: Optional[str], dtype: torch.dtype,
                     vocab_size: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    from megatron.core.models.mamba.hf_mapping import megatron_to_hf

    if hf_model_type not in (None, "mamba2", "nemotron_h"):
        raise ConversionError(f"--hf-model-type {hf_model_type}: Mamba checkpoints export as mamba2 or nemotron_h")
    pattern = _pattern(args)
    if args.normalization != "RMSNorm" or args.add_bias_linear:
        raise ConversionError("Mamba2 and NemotronH need --normalization RMSNorm and --disable-bias-linear")
    tied = not args.untie_embeddings_and_output_weights
    heads = args.mamba_num_heads or 2 * args.hidden_size // args.mamba_head_dim
    if hf_model_type == "nemotron_h" or set(pattern) != {"M"}:
        return _export_nemotron_h(state_dict, args, pattern, heads, tied, dtype, vocab_size)
    config = {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": vocab_size,
        "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers, "state_size": args.mamba_state_dim,
        "num_heads": heads, "head_dim": args.mamba_head_dim, "n_groups": args.mamba_num_groups,
        "expand": _expand(heads * args.mamba_head_dim, args.hidden_size), "conv_kernel": 4, "chunk_size": 128,
        "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "rms_norm": True,
        # time_step_limit is left out: transformers' default (0, inf) is the mixer's (no dt limit).
        "layer_norm_epsilon": args.norm_epsilon, "residual_in_fp32": True, "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    weights = megatron_to_hf(state_dict, args.num_layers, tied)
    if tied:
        weights.pop("lm_head.weight", None)  # transformers ties it on load
    return {k: v.to(dtype) for k, v in weights.items()}, config


_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def _export_nemotron_h(state_dict, args, pattern: str, heads: int, tied: bool, dtype: torch.dtype,
                       vocab_size: int) -> Tuple[Dict[str, torch.Tensor], dict]:
    from megatron.core.models.mamba import hf_mapping_nemotron_h

    if set(pattern) - set(_BLOCK_TYPES):
        raise ConversionError(f"layer pattern {pattern!r}: NemotronH export maps M, * and - layers only")
    if "-" in pattern and not args.squared_relu:
        raise ConversionError("NemotronH MLPs use squared ReLU: only --squared-relu hybrids export to nemotron_h")
    if "*" in pattern and args.position_embedding_type != "none":
        raise ConversionError("NemotronH attention has no position embedding: only --position-embedding-type none "
                              "exports to nemotron_h")
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    config = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": vocab_size,
        "hidden_size": args.hidden_size, "layers_block_type": [_BLOCK_TYPES[s] for s in pattern],
        "num_hidden_layers": len(pattern), "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": groups, "head_dim": args.kv_channels, "intermediate_size": args.ffn_hidden_size,
        "max_position_embeddings": args.max_position_embeddings, "mlp_hidden_act": "relu2", "mlp_bias": False,
        "attention_bias": False, "ssm_state_size": args.mamba_state_dim, "mamba_num_heads": heads,
        "mamba_head_dim": args.mamba_head_dim, "n_groups": args.mamba_num_groups, "conv_kernel": 4,
        "expand": _expand(heads * args.mamba_head_dim, args.hidden_size), "chunk_size": 128,
        "use_conv_bias": True, "use_bias": False, "mamba_proj_bias": False, "mamba_hidden_act": "silu",
        "layer_norm_epsilon": args.norm_epsilon, "residual_in_fp32": False, "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    weights = hf_mapping_nemotron_h.megatron_to_hf(state_dict, config, prefix=hf_mapping_nemotron_h.FILE_PREFIX)
    if tied:
        weights.pop("lm_head.weight", None)  # transformers ties it on load
    return {k: v.to(dtype) for k, v in weights.items()}, config
