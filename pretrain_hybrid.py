"""Pretrain a Mamba-2 or hybrid (Mamba + attention + MLP/MoE) language model.

    torchrun --nproc-per-node N pretrain_hybrid.py --hybrid-layer-pattern "M-M*-M-M-" <Megatron-LM flags>

The layer kinds come from --hybrid-layer-pattern (or the older --hybrid-attention-ratio /
--hybrid-mlp-ratio / --hybrid-override-pattern); the mixer shape from --mamba-*. Data,
batches and the loss are GPT's: the same datasets, the same forward step.
"""

from __future__ import annotations

from megatron.core.models.mamba import MambaModel
from megatron.core.models.mamba.layer_pattern import MOE, stage_segment
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.ssm.mamba_context_parallel import check_context_parallel_split
from megatron.core.transformer.enums import ModelType
from megatron.training import get_args, pretrain, print_rank_0
from megatron.training.config_from_args import build_config, core_transformer_config_from_args
from megatron.training.hybrid_flops import hybrid_layer_pattern_of
from megatron.training.initialize import shutdown_megatron
from megatron.training.language_model_args import language_model_kwargs
from pretrain_gpt import forward_step, train_valid_test_datasets_provider

# The hybrid FLOP count in the log line; Mamba layers need no position embedding.
HYBRID_DEFAULTS = {"is_hybrid_model": True}


# GPT flags that shape a transformer stack; a hybrid stack takes its shape from the pattern,
# so each would be ignored: (flag, attribute, why, what to do instead).
_GPT_STACK_FLAGS = (
    ("--mtp-num-layers", "mtp_num_layers", "multi-token prediction is not implemented for hybrid models",
     "drop it"),
    ("--multi-latent-attention", "multi_latent_attention", "the attention layers ('*') of a hybrid model are "
     "standard self-attention", "drop it"),
    ("--moe-layer-freq", "moe_layer_freq", "MoE layers sit where the pattern has 'E'", "drop it and place 'E' layers"),
    ("--decoder-first-pipeline-num-layers", "decoder_first_pipeline_num_layers", "the pipeline stages of a hybrid "
     "model follow the '|' cuts of its pattern", "cut the pattern with '|'"),
    ("--decoder-last-pipeline-num-layers", "decoder_last_pipeline_num_layers", "the pipeline stages of a hybrid "
     "model follow the '|' cuts of its pattern", "cut the pattern with '|'"),
)


def _refuse_gpt_stack_flags(args, pattern: str) -> None:
    for flag, name, why, instead in _GPT_STACK_FLAGS:
        value = getattr(args, name, None)
        given = value not in (None, 1) if name == "moe_layer_freq" else bool(value)
        if given:
            shown = "" if value is True else f" {value}"
            raise ValueError(f"{flag}{shown} is not supported for hybrid models: {why}; {instead}")
    if getattr(args, "num_experts", None) and MOE not in pattern:
        raise ValueError(f"--num-experts {args.num_experts} is given but the hybrid layer pattern {pattern!r} has no "
                         f"MoE layer ('{MOE}'): add 'E' layers to --hybrid-layer-pattern, or drop --num-experts")


def check_hybrid_layout(args) -> str:
    """The layer pattern, after refusing layouts the hybrid model does not support."""
    mamba = build_config(MambaConfig, args)
    mamba.validate(args.hidden_size, args.tensor_model_parallel_size)
    check_context_parallel_split(mamba.num_heads(args.hidden_size) // args.tensor_model_parallel_size,
                                 mamba.mamba_num_groups // args.tensor_model_parallel_size, args.context_parallel_size)
    if args.position_embedding_type not in ("none", "rope"):
        raise ValueError(f"--position-embedding-type {args.position_embedding_type} is not supported for hybrid "
                         "models: pass --position-embedding-type none (or rope for the attention layers)")
    pattern = hybrid_layer_pattern_of(args)
    _refuse_gpt_stack_flags(args, pattern)
    # refuses a cut that does not fit the stages (virtual ones included)
    stage_segment(pattern, args.pipeline_model_parallel_size, 0, args.virtual_pipeline_model_parallel_size)
    return pattern


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None) -> MambaModel:
    """The hybrid model of this pipeline stage, shaped by the command line."""
    args = get_args()
    pattern = check_hybrid_layout(args)
    print_rank_0(f"building hybrid model, layer pattern {pattern} ...")
    return MambaModel(
        config=core_transformer_config_from_args(args),
        mamba_config=build_config(MambaConfig, args),
        hybrid_layer_pattern=pattern,
        **language_model_kwargs(args, pre_process, post_process),
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
    )


def main() -> None:
    """Train with the command line's flags (also the ``megatron-pretrain-hybrid`` command)."""
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             args_defaults=HYBRID_DEFAULTS)
    shutdown_megatron()


if __name__ == "__main__":
    main()
