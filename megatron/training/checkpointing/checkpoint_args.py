"""--use-checkpoint-args: take the model's architecture from the checkpoint being loaded.

Megatron's ``load_args_from_checkpoint``: before the arguments are validated, the saved
arguments of the checkpoint under ``--load`` (the tracker's iteration, or ``--ckpt-step``)
are read, and

- the sizes below (``FILL_IF_UNSET``) are copied where the command line left them unset;
- the architecture switches (``FORCED``) are always copied, so that a checkpoint saved
  with SwiGLU, RMSNorm or grouped-query attention gets that model whatever the script's
  defaults say;
- with ``--use-mp-args-from-checkpoint-args`` the tensor/pipeline/expert parallel sizes too;
- the tokenizer model path unless ``--no-use-tokenizer-model-from-checkpoint-args``.

One exception: a checkpoint imported from Hugging Face records the ``NullTokenizer`` (token
ids in, token ids out); a ``--tokenizer-type`` given on the command line replaces it, so
that such a checkpoint can be served with its real tokenizer.

Only names this framework's parser knows are copied; every copied value is logged. A
missing checkpoint leaves the arguments as they are (with a warning), or stops with
``--exit-on-missing-checkpoint``, as in Megatron.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from typing import Dict, Optional, Tuple


from megatron.training.checkpointing import fsdp_dtensor_format, megatron_lm, torch_dcp_format
from megatron.training.checkpointing.directory import CheckpointError, iteration_dir, read_tracker
from megatron.training.checkpointing.torch_dist_format import is_torch_dist_checkpoint, read_common
from megatron.training.checkpointing.torch_format import MODEL_FILENAME, load_own_file

logger = logging.getLogger(__name__)

FILL_IF_UNSET = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "kv_channels",
    "max_position_embeddings", "vocab_size",
)
FORCED = (
    "num_query_groups", "group_query_attention", "position_embedding_type", "add_position_embedding",
    "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved",
    "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor",
    "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu", "untie_embeddings_and_output_weights",
    "apply_layernorm_1p", "normalization", "norm_epsilon", "qk_layernorm", "apply_query_key_layer_scaling",
    "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk", "moe_token_dispatcher_type",
    "moe_router_pre_softmax", "moe_grouped_gemm", "moe_shared_expert_intermediate_size",
    "tokenizer_type", "make_vocab_size_divisible_by",
    # not in Megatron's list, but a sliding-window model without its window computes other logits
    "window_size",
    # nor these: gpt-oss's per-layer windows and its gated unit change the logits too
    "window_attn_skip_freq", "glu_linear_offset", "activation_func_clamp_value",
    # and Llama 4's layers without RoPE
    "no_rope_freq",
    # multi-latent attention: its projection shapes (Megatron copies these too)
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "rotary_scaling_factor", "mscale", "mscale_all_dim",
    # a Mamba/hybrid model: its layer layout and mixer shape (Megatron copies the layout flags)
    "is_hybrid_model", "hybrid_layer_pattern", "hybrid_override_pattern", "hybrid_attention_ratio", "hybrid_mlp_ratio",
    "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
    # BERT: the post-LayerNorm (Hugging Face) layout, the binary head, and the GeLU form
    # (exact, tanh-approximated by the fused bias-GeLU, or OpenAI's) all change the model
    "transformer_block_type", "bert_binary_head", "openai_gelu", "bias_gelu_fusion",
)
MODEL_PARALLEL = (
    # the virtual stages as a count: saved (validated) arguments hold both forms
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_virtual_stages_per_pipeline_rank",
    "expert_model_parallel_size",
)
TOKENIZER_MODEL = ("tokenizer_model", "vocab_file", "merge_file")

# The run-argument attribute in which tools/checkpoint/convert.py's import records the
# Hugging Face architecture it read (not a flag: the training scripts never read it). A
# family whose architectures differ in their heads (BERT's headless BertModel) builds the
# model the checkpoint holds from it; --use-checkpoint-args carries it along.
IMPORTED_ARCHITECTURE = "imported_hf_architecture"


def _checkpoint_dir(args: argparse.Namespace) -> Optional[str]:
    root = args.load
    if args.ckpt_step is not None:
        return iteration_dir(root, args.ckpt_step)
    iteration, release = read_tracker(root)
    if iteration is None:
        return None
    return iteration_dir(root, iteration, release)


def read_saved_args(directory: str) -> argparse.Namespace:
    """The arguments saved with the checkpoint in ``directory`` (torch_dist or torch format,
    ours or Megatron-LM's; our torch_dcp and fsdp_dtensor)."""
    if megatron_lm.is_megatron_checkpoint(directory):
        saved = megatron_lm.read_saved_args(directory)
    elif is_torch_dist_checkpoint(directory) or fsdp_dtensor_format.holds_torch_dist_layout(directory):
        saved = read_common(directory, None).get("args")
    elif torch_dcp_format.is_torch_dcp_checkpoint(directory):
        saved = torch_dcp_format.read_common(directory).get("args")
    else:
        files = sorted(glob.glob(os.path.join(directory, "mp_rank_*", MODEL_FILENAME)))
        if not files:
            raise CheckpointError(
                f"--use-checkpoint-args: {directory} holds neither a torch_dist checkpoint (.metadata) nor "
                f"torch-format files (mp_rank_*/{MODEL_FILENAME}); point --load at a checkpoint directory"
            )
        saved = load_own_file(files[0]).get("args")
    if saved is None:
        raise CheckpointError(
            f"--use-checkpoint-args: the checkpoint in {directory} was saved without its arguments; "
            "pass the architecture flags on the command line instead"
        )
    return saved


def _names_to_copy(args: argparse.Namespace) -> Dict[str, bool]:
    """{argument name: forced} of what to take from the checkpoint."""
    names = {name: False for name in FILL_IF_UNSET}
    names.update({name: True for name in FORCED})
    if getattr(args, "use_mp_args_from_checkpoint_args", False):
        names.update({name: True for name in MODEL_PARALLEL})
    if getattr(args, "use_tokenizer_model_from_checkpoint_args", True):
        names.update({name: True for name in TOKENIZER_MODEL})
    return names


def load_args_from_checkpoint(args: argparse.Namespace) -> Tuple[argparse.Namespace, Optional[argparse.Namespace]]:
    """``args`` updated from the checkpoint under ``--load``, and the saved arguments (None
    when there is no checkpoint to read)."""
    if not args.load:
        raise ValueError("--use-checkpoint-args needs --load DIR: the arguments come from the checkpoint there")
    directory = _checkpoint_dir(args)
    if directory is None or not os.path.isdir(directory):
        where = directory or f"{args.load} (no latest_checkpointed_iteration.txt)"
        if getattr(args, "exit_on_missing_checkpoint", False):
            raise CheckpointError(f"--use-checkpoint-args: no checkpoint at {where} and --exit-on-missing-checkpoint "
                                  "is set; check --load / --ckpt-step")
        logger.warning("--use-checkpoint-args: no checkpoint at %s; keeping the command-line arguments", where)
        return args, None
    saved = read_saved_args(directory)
    for name, forced in _names_to_copy(args).items():
        if not hasattr(args, name) or not hasattr(saved, name):
            continue
        value = getattr(saved, name)
        if value is None or (not forced and getattr(args, name) is not None):
            continue
        if name == "tokenizer_type" and value == "NullTokenizer" and args.tokenizer_type not in (None, value):
            logger.info("--use-checkpoint-args: keeping --tokenizer-type %s (the checkpoint records the "
                        "NullTokenizer)", args.tokenizer_type)
            continue
        # Every value taken is logged, also one equal to what the command line said: the
        # user sees the whole architecture that came from the checkpoint.
        logger.info("--use-checkpoint-args: %s = %r from %s", name, value, directory)
        setattr(args, name, value)
    if getattr(saved, IMPORTED_ARCHITECTURE, None) is not None:
        setattr(args, IMPORTED_ARCHITECTURE, getattr(saved, IMPORTED_ARCHITECTURE))
    return args, saved
