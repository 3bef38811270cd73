"""Megatron flags that are parsed here but not acted on, and what happens when one is set.

Megatron users bring scripts full of flags, so the parser accepts all of Megatron's. A flag
that is not implemented must still never be ignored silently:

- REFUSED: the flag changes what is trained, evaluated or stored (the model, the data, the
  numerics, the checkpoints). Setting it to anything but Megatron's default is an error
  that names the flag and says what to do instead.
- WITHOUT_EFFECT: the flag only tunes speed, memory or logging. Setting it is accepted and
  rank 0 logs one warning listing every such flag with what happens instead, so scripts
  run unchanged and nobody is surprised.

Megatron flags the argument groups do not define at all (other model families, kernel
libraries, monitors, old spellings) are registered by ``flag_table`` with the same two
outcomes; together these are the one table behind docs/flags.md.

Flags of model families that pretrain_gpt.py does not build (BERT/T5 masking, T5 decoder
depth) are ignored by GPT training here exactly as by Megatron's pretrain_gpt.py, and are
not listed.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple

# dest: (flag, what is missing, what to do instead)
REFUSED: Dict[str, Tuple[str, str, str]] = {}

# dest: (flag, what happens instead)
WITHOUT_EFFECT: Dict[str, Tuple[str, str]] = {
    "use_flash_attn": ("--use-flash-attn", "attention runs through torch SDPA, which picks cuDNN or flash kernels"),
    "masked_softmax_fusion": ("--no-masked-softmax-fusion", "attention runs through torch SDPA (no separate softmax)"),
    "transformer_impl": ("--transformer-impl", "the local PyTorch layers are always used (as with local)"),
    "recompute_modules": ("--recompute-modules", "selective recompute covers core attention only"),
    "moe_layer_recompute": ("--moe-layer-recompute", "MoE layers recompute only under --recompute-granularity full"),
    "moe_shared_expert_overlap": ("--moe-shared-expert-overlap", "shared experts run in order with the routed ones"),
    "moe_permute_fusion": ("--moe-permute-fusion", "token permutation runs unfused"),
    "check_weight_hash_across_dp_replicas_interval": (
        "--check-weight-hash-across-dp-replicas-interval", "weights are not hashed across data-parallel replicas"),
    "auto_detect_ckpt_format": ("--auto-detect-ckpt-format", "the format is always detected when loading"),
    "use_dist_ckpt_deprecated": ("--use-dist-ckpt", "deprecated in Megatron too: --ckpt-format chooses the format"),
    "dist_ckpt_format_deprecated": ("--dist-ckpt-format", "deprecated in Megatron too: --ckpt-format chooses"),
    "ckpt_fully_parallel_save": ("--no-ckpt-fully-parallel-save", "every rank writes its own shards"),
    "ckpt_fully_parallel_load": ("--ckpt-fully-parallel-load", "every rank reads its own shards"),
    "save_tokenizer_assets": ("--no-save-tokenizer-assets", "tokenizer files are not copied into checkpoints"),
    "non_persistent_local_ckpt_algo": ("--non-persistent-local-ckpt-algo", "each rank writes its complete state "
                                       "into one file of its own either way (no de-duplication of data-parallel "
                                       "replicas): what is restored is the same"),
    "overlap_p2p_communication_warmup_flush": (
        "--overlap-p2p-communication-warmup-flush", "with --overlap-p2p-communication warmup and flush "
        "exchanges are already waited for only before the step that needs them"),
    "align_param_gather": ("--no-align-param-gather", "each model chunk starts its parameter all-gather itself"),
    "overlap_param_gather_with_optimizer_step": (
        "--overlap-param-gather-with-optimizer-step", "the parameter all-gather overlaps the next forward"),
    "scatter_gather_tensors_in_pipeline": (
        "--no-scatter-gather-tensors-in-pipeline", "stages exchange whole [s/(cp*(tp if SP)), b, h] tensors"),
    "use_ring_exchange_p2p": ("--use-ring-exchange-p2p", "pipeline exchanges use batched isend/irecv"),
    "nccl_communicator_config_path": ("--nccl-communicator-config-path", "NCCL communicators use NCCL's "
                                      "defaults and the NCCL_* environment variables"),
    "enable_gloo_process_groups": ("--disable-gloo-process-groups", "no gloo twins of the groups are created anyway"),
    "use_sharp": ("--use-sharp", "set NCCL_COLLNET_ENABLE=1 in the environment instead"),
    "log_energy": ("--log-energy", "energy is not logged"),
    "use_torch_optimizer_for_cpu_offload": ("--use-torch-optimizer-for-cpu-offload",
                                            "the offloaded CPU step always runs torch's AdamW"),
}


# Flags of model families pretrain_gpt.py does not build; GPT training ignores them, as
# Megatron's does.
OTHER_MODEL_FAMILIES: Dict[str, str] = {
    "mask_prob": "BERT/T5 masking", "short_seq_prob": "BERT/T5 sample lengths",
    "decoder_num_layers": "T5 decoder depth",
    "bert_load": "ICT/REALM initialization from a BERT checkpoint",
}

# Values that mean what this framework does anyway.
_SAME_AS_HERE = {"recompute_modules": (["core_attn"],), "transformer_impl": ("local",)}


def status_note(dest: str) -> Optional[str]:
    """What --help adds to the help of a flag parsed here but not acted on, or None."""
    if dest in REFUSED:
        return f"Refused here unless left at its default: {REFUSED[dest][1]}."
    if dest in WITHOUT_EFFECT:
        return f"No effect here: {WITHOUT_EFFECT[dest][1]}."
    return None


def annotate_help(parser: argparse.ArgumentParser) -> None:
    """Append ``status_note`` to the help of every flag it applies to, so that --help never
    promises what the flag does in Megatron-LM when it does something else here."""
    for action in parser._actions:
        note = status_note(action.dest)
        if note is None or not action.help:
            continue
        note = note.replace("%", "%%")  # help strings are argparse format strings
        if not action.help.endswith(note):
            action.help = f"{action.help} {note}"


def _is_set(dest: str, value, default) -> bool:
    if value == default or value in _SAME_AS_HERE.get(dest, ()):
        return False
    return not (value in (None, [], (), False) and default in (None, [], (), False))


def check_unimplemented(args: argparse.Namespace, defaults: argparse.Namespace) -> List[str]:
    """Raise ValueError for a REFUSED flag set to anything but its default, or a refused
    flag of the flag table that was given; return one line per WITHOUT_EFFECT or no-effect
    table flag that is set (``--flag: what happens instead``)."""
    from megatron.training.argument_checks import invalid  # the house error format
    from megatron.training.flag_table import check_table_flags

    for dest, (flag, missing, fix) in REFUSED.items():
        value = getattr(args, dest, None)
        if _is_set(dest, value, getattr(defaults, dest, None)):
            raise invalid(flag, value, f"is not supported: {missing}", fix)
    lines = [f"{flag}: {instead}" for dest, (flag, instead) in WITHOUT_EFFECT.items()
             if _is_set(dest, getattr(args, dest, None), getattr(defaults, dest, None))]
    return lines + check_table_flags(args)
