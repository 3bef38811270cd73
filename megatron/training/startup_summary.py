"""The start-up summary: what this run trains, on which layout, how fast it must go and how
much memory it should take; logged once by rank 0 before the first iteration."""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

from megatron.core.fake_backend import is_fake
from megatron.core.process_groups import ProcessGroups
from megatron.training.flops import num_floating_point_operations
from megatron.training.memory_estimate import MemoryEstimate, estimate_memory, format_memory, num_microbatches

logger = logging.getLogger(__name__)


def activation_name(args) -> str:
    """The MLP activation the flags select (``config_from_args._activation_overrides``)."""
    if args.swiglu:
        return "swiglu"
    for flag, name in (("squared_relu", "squared relu"), ("openai_gelu", "openai gelu"),
                       ("quick_geglu", "quick geglu")):
        if getattr(args, flag):
            return name
    return "gelu"


def describe_model(args) -> str:
    """``24 layers, hidden 2048, ffn 5632, 16 heads (4 query groups, kv channels 128), ...``"""
    groups = f"{args.num_query_groups} query groups, " if args.group_query_attention else ""
    parts = [
        f"{args.num_layers} layers", f"hidden {args.hidden_size}", f"ffn {args.ffn_hidden_size}",
        f"{args.num_attention_heads} heads ({groups}kv channels {args.kv_channels})",
        f"seq {args.seq_length}", f"vocab {args.padded_vocab_size} (padded)",
        activation_name(args), args.normalization,
        f"{args.position_embedding_type} positions",
        "untied embeddings" if args.untie_embeddings_and_output_weights else "tied embeddings",
    ]
    if args.num_experts:
        parts.append(f"{args.num_experts} experts (top {args.moe_router_topk})")
    return ", ".join(parts)


def describe_layout(args) -> str:
    """``world 8 = TP 2 x CP 1 x DP 2 x PP 2 (VPP 1, EP 1, SP on)``"""
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    return (f"world {args.world_size} = TP {args.tensor_model_parallel_size} x CP {args.context_parallel_size}"
            f" x DP {args.data_parallel_size} x PP {args.pipeline_model_parallel_size} (VPP {vpp}, EP "
            f"{args.expert_model_parallel_size}, SP {'on' if args.sequence_parallel else 'off'});"
            f" micro-batch {args.micro_batch_size}, global batch {args.global_batch_size},"
            f" {num_microbatches(args)} micro-batches per step per DP rank")


def describe_precision(args) -> str:
    params = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    grads = "fp32" if (params == "fp32" or args.accumulate_allreduce_grads_in_fp32) else params
    main_dtype = args.main_params_dtype if args.use_precision_aware_optimizer else "fp32"
    main = f", {main_dtype} main params" if params != "fp32" else ""
    sharded = ""
    if args.use_distributed_optimizer:
        instances = args.num_distributed_optimizer_instances
        sharded = f" (distributed optimizer{f', {instances} instances' if instances > 1 else ''})"
    if args.use_precision_aware_optimizer:
        sharded += f", moments {args.exp_avg_dtype}/{args.exp_avg_sq_dtype}"
    if args.optimizer_cpu_offload:
        sharded += f", {args.optimizer_offload_fraction:.0%} of its state on the CPU"
    return f"{params} params, {grads} grads{main}, {args.optimizer} optimizer{sharded}"


def summary_lines(args, total_params: int, embedding_params: int, rank_params: int, position: str,
                  estimate: MemoryEstimate, flops_func=None) -> List[str]:
    flops = (flops_func or num_floating_point_operations)(args, args.global_batch_size)
    return [
        "run summary:",
        f"  model: {describe_model(args)}",
        f"  parameters: {total_params:,} total ({total_params / 1e9:.3f} B; embedding {embedding_params:,});"
        f" {rank_params:,} on {position}",
        f"  layout: {describe_layout(args)}",
        f"  precision: {describe_precision(args)}",
        f"  FLOPs per iteration: {flops:.3e} ({flops / args.world_size / 1e12:.2f} TFLOP per GPU)",
        f"  estimated memory on {position}: {format_memory(estimate)}",
    ]


def log_startup_summary(args, model: List[torch.nn.Module], pg: ProcessGroups, model_provider=None,
                        flops_func=None) -> Optional[str]:
    """Log the summary on rank 0, for rank 0: the first pipeline stage, which holds the most
    micro-batches in flight (--dry-run reports every stage); with --fake-process-group for the
    rank the process plays. ``model_provider`` lets the total be counted on the meta device;
    without it (or if that fails) the total shown is the rank's."""
    from megatron.training.model_census import chunk_shapes, count_full_model, rank_params

    if args.rank != 0 and not is_fake():
        return None
    params = rank_params(model)
    total, embedding = params.total, 0
    if model_provider is not None:
        try:
            total, embedding = count_full_model(model_provider)
        except Exception as err:  # a provider that cannot build on the meta device: the summary must not stop the run
            logger.debug("model not counted on the meta device: %s", err)
    pp_rank = pg.rank("pp")
    estimate = estimate_memory(args, params, chunk_shapes(model), pp_rank)
    position = f"rank {args.rank} (tp {pg.rank('tp')}, pp {pp_rank})"
    text = "\n".join(summary_lines(args, total, embedding, params.total, position, estimate, flops_func))
    logger.info(text)
    return text
