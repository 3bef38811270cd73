"""--use-torch-fsdp2: which layouts and flags it takes, and wrapping the model chunks.

FSDP2 shards params, grads and optimizer state over the data x context parallel ranks
(``megatron.core.distributed.torch_fully_sharded_data_parallel``); tensor parallelism
composes with it. As in Megatron-LM it is refused with pipeline or expert parallelism,
the distributed optimizer (FSDP2 already shards the optimizer state), --fp16 (no loss
scaler) and tied embeddings; checkpoints are saved in --ckpt-format torch_dcp.
"""

from __future__ import annotations

import argparse
import logging
from typing import List

import torch

from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel
from megatron.core.process_groups import ProcessGroups

logger = logging.getLogger(__name__)

DCP_FORMAT = "torch_dcp"
MEGATRON_FSDP_FORMAT = "fsdp_dtensor"


def _refusal(flag: str, value, rule: str, fix: str) -> ValueError:
    from megatron.training.argument_checks import invalid  # the house error format

    return invalid(flag, value, rule, fix)


def check_fsdp2(args: argparse.Namespace) -> None:
    """Refuse what cannot work with (or without) --use-torch-fsdp2, naming the fix."""
    if not args.use_torch_fsdp2:
        if args.ckpt_format == DCP_FORMAT:
            raise _refusal("--ckpt-format", DCP_FORMAT, "is the checkpoint format of FSDP2 runs (sharded DTensors)",
                           "add --use-torch-fsdp2, or save in --ckpt-format torch_dist (the default) or torch")
        if args.ckpt_convert_format == DCP_FORMAT:
            _check_conversion_layout(args)
        return
    # --use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params runs this path
    # and saves the same files as --ckpt-format fsdp_dtensor (megatron_fsdp.py).
    own = "--use-megatron-fsdp" if args.use_megatron_fsdp else "--use-torch-fsdp2"
    formats = (DCP_FORMAT, MEGATRON_FSDP_FORMAT) if args.use_megatron_fsdp else (DCP_FORMAT,)
    rules = (
        (args.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size", args.pipeline_model_parallel_size,
         "pipeline parallelism is not combined with FSDP2 (as in Megatron-LM)",
         "use --pipeline-model-parallel-size 1, or the distributed optimizer instead of FSDP2"),
        (args.expert_model_parallel_size > 1, "--expert-model-parallel-size", args.expert_model_parallel_size,
         "expert parallelism is not combined with FSDP2 (as in Megatron-LM)",
         "use --expert-model-parallel-size 1, or the distributed optimizer instead of FSDP2"),
        (args.use_distributed_optimizer, "--use-distributed-optimizer", True,
         "FSDP2 already shards the optimizer state over data-parallel ranks", "drop --use-distributed-optimizer"),
        (args.fp16, "--fp16", True, "FSDP2 has no loss scaler (nor in Megatron-LM)", "train with --bf16"),
        (not args.untie_embeddings_and_output_weights, own, True,
         "with --data-parallel-sharding-strategy optim_grads_params runs FSDP2 here, which needs untied input "
         "and output embeddings" if args.use_megatron_fsdp else
         "needs untied input and output embeddings (as in Megatron-LM)",
         "add --untie-embeddings-and-output-weights"
         + (", or use --data-parallel-sharding-strategy optim_grads" if args.use_megatron_fsdp else "")),
        (args.save is not None and args.ckpt_format not in formats, "--ckpt-format", args.ckpt_format,
         "FSDP2 runs save sharded DTensors, in the torch_dcp format", f"add --ckpt-format {formats[-1]}"),
        (args.ckpt_convert_format not in (None, DCP_FORMAT), "--ckpt-convert-format", args.ckpt_convert_format,
         "an FSDP2 run holds sharded DTensors and writes them in the torch_dcp format only",
         f"use --ckpt-convert-format {DCP_FORMAT} (to reshard), or convert without --use-torch-fsdp2"),
        (args.async_save, "--async-save", True, f"is not implemented for --ckpt-format {args.ckpt_format} under FSDP2",
         "drop --async-save"),
        (args.ckpt_megatron_lm_layout, "--ckpt-megatron-lm-layout", True,
         "writes torch or torch_dist files, which an FSDP2 run does not save",
         "drop it; convert a saved torch_dcp checkpoint's weights with dcp_to_torch (docs/parallelism.md)"),
        (args.overlap_param_gather, "--overlap-param-gather", True,
         "belongs to the distributed optimizer; FSDP2 gathers each layer's params just before it runs",
         "drop --overlap-param-gather"),
    )
    for refused, flag, value, rule, fix in rules:
        if refused:
            raise _refusal(flag, value, rule, fix)


def _check_conversion_layout(args: argparse.Namespace) -> None:
    """--ckpt-convert-format torch_dcp without FSDP2 writes the weights for an FSDP2 run,
    so the converting run must hold them as FSDP2 will: one pipeline stage, no expert
    parallelism, untied embeddings (torch_dist checkpoints load into that layout)."""
    rules = (
        (args.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
        (args.expert_model_parallel_size > 1, "--expert-model-parallel-size", args.expert_model_parallel_size),
        (not args.untie_embeddings_and_output_weights, "--untie-embeddings-and-output-weights", False),
    )
    for refused, flag, value in rules:
        if refused:
            raise _refusal(flag, value, "--ckpt-convert-format torch_dcp writes weights for an FSDP2 run, which has "
                           "one pipeline stage, no expert parallelism and untied embeddings",
                           "convert with --pipeline-model-parallel-size 1 --expert-model-parallel-size 1 "
                           "--untie-embeddings-and-output-weights and the tensor-parallel size of the FSDP2 run "
                           "(a torch_dist checkpoint loads into that layout)")


def wrap_with_fsdp2(chunks: List[torch.nn.Module], config, ddp_config, args: argparse.Namespace,
                    pg_collection: ProcessGroups) -> List[torch.nn.Module]:
    """Each chunk in ``TorchFullyShardedDataParallel`` (bf16 compute with --bf16)."""
    if args.overlap_grad_reduce and args.rank == 0:
        logger.info("--overlap-grad-reduce with --use-torch-fsdp2: FSDP2 always reduce-scatters each layer's "
                    "grads as soon as its backward is done")
    param_dtype = torch.bfloat16 if args.bf16 else None
    return [
        TorchFullyShardedDataParallel(config, ddp_config, chunk, pg_collection, param_dtype=param_dtype,
                                      reshard_after_forward=args.torch_fsdp2_reshard_after_forward)
        for chunk in chunks
    ]
