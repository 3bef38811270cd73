"""--model-type Mamba: Hugging Face ``Mamba2ForCausalLM`` import and export, and resharding
of hybrid checkpoints (built by pretrain_hybrid.py's model provider).

Export needs a pattern of Mamba layers only (``Mamba2ForCausalLM`` has no attention or MLP
layers); a hybrid checkpoint still reshards between layouts.
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

    if hf_config.get("model_type") != "mamba2":
        raise ConversionError(f"--model-type Mamba imports Mamba2 models, got model_type "
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


def mamba_hf_to_core(weights: Dict[str, torch.Tensor], hf_config: dict) -> Dict[str, torch.Tensor]:
    from megatron.core.models.mamba.hf_mapping import hf_to_megatron

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

    if hf_model_type not in (None, "mamba2"):
        raise ConversionError(f"--hf-model-type {hf_model_type}: Mamba checkpoints export as mamba2 only")
    pattern = _pattern(args)
    if set(pattern) != {"M"}:
        raise ConversionError(f"layer pattern {pattern!r}: only Mamba-only models export to Mamba2ForCausalLM "
                              "(it has no attention or MLP layers)")
    if args.normalization != "RMSNorm" or args.add_bias_linear:
        raise ConversionError("Mamba2ForCausalLM needs --normalization RMSNorm and --disable-bias-linear")
    tied = not args.untie_embeddings_and_output_weights
    heads = args.mamba_num_heads or 2 * args.hidden_size // args.mamba_head_dim
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
