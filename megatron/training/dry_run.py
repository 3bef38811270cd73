"""``--dry-run``: plan a run in one process, without a GPU, in seconds.

The flags are parsed and checked for ``--dry-run-world-size`` ranks exactly as a real launch
checks them; then, for each pipeline stage, the parallel groups of one rank of that stage are
built on torch's fake process-group backend (no communication, no other process) and the
stage's model chunks are built by the script's own model provider on the meta device (shapes
only). Every rank of a stage holds the same numbers of parameters: tensor, context, data and
expert parallel ranks differ only in which shard they hold. The report gives, per stage, the
parameters and the estimated memory (``memory_estimate``) with and without the distributed
optimizer and with each recompute choice. See docs/dry_run.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from megatron.core import parallel_state
from megatron.training.arguments import validate_args
from megatron.training.fake_process_group import init_fake_process_group
from megatron.training.global_vars import set_global_variables, set_tokenizer
from megatron.training.memory_estimate import (
    ChunkShape,
    MemoryEstimate,
    RankParams,
    configured_recompute,
    estimate_memory,
    format_bytes,
)
from megatron.training.model_census import chunk_shapes, count_full_model, on_meta_device, rank_params
from megatron.training.startup_summary import describe_layout, describe_model, describe_precision


@dataclass
class StagePlan:
    """What every rank of one pipeline stage holds."""

    pp_rank: int
    ranks: List[int]
    params: RankParams
    chunks: List[ChunkShape]


def _layout_kwargs(args) -> Dict:
    return dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        order="tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp",
    )


def plan_stages(args, model_provider: Callable) -> List[StagePlan]:
    """Build each pipeline stage's chunks on the meta device, as one of its ranks."""
    from megatron.training.model_setup import build_model_chunks

    kwargs = _layout_kwargs(args)
    layout = parallel_state.build_layout(args.world_size, **kwargs)
    pp_groups = parallel_state.layout_groups(layout)["pp"]
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    plans = []
    for pp_rank in range(args.pipeline_model_parallel_size):
        init_fake_process_group(args.world_size, pp_groups[0][pp_rank])
        try:
            pg = parallel_state.initialize_model_parallel(virtual_pipeline_model_parallel_size=vpp, **kwargs)
            with on_meta_device():
                chunks = build_model_chunks(model_provider, pg, vpp)
            plans.append(StagePlan(pp_rank, sorted(g[pp_rank] for g in pp_groups), rank_params(chunks),
                                   chunk_shapes(chunks)))
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return plans


def _full_recompute_args(args):
    """The flags with full recompute: the run's own method and group size when it uses full
    recompute, else Megatron's common choice, uniform with one layer per group."""
    if configured_recompute(args) == "full":
        return args
    copy = type(args)(**vars(args))
    copy.recompute_method, copy.recompute_num_layers = "uniform", 1
    return copy


def stage_estimates(args, plan: StagePlan) -> Dict[str, MemoryEstimate]:
    """The stage's memory with the run's flags and with each alternative."""
    full_args = _full_recompute_args(args)
    out = {"configured": estimate_memory(args, plan.params, plan.chunks, plan.pp_rank)}
    for dist_opt in (False, True):
        out[f"optimizer dist={dist_opt}"] = estimate_memory(args, plan.params, plan.chunks, plan.pp_rank,
                                                            distributed_optimizer=dist_opt, recompute=None)
    for recompute in (None, "selective"):
        out[f"recompute {recompute}"] = estimate_memory(args, plan.params, plan.chunks, plan.pp_rank,
                                                        recompute=recompute)
    out["recompute full"] = estimate_memory(full_args, plan.params, plan.chunks, plan.pp_rank, recompute="full")
    return out


def _ranks_text(ranks: List[int]) -> str:
    if len(ranks) > 8:
        return f"{len(ranks)} ranks: {', '.join(map(str, ranks[:4]))}, ..., {ranks[-1]}"
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def stage_report(args, plan: StagePlan) -> List[str]:
    est = stage_estimates(args, plan)
    n_layers = sum(c.num_layers for c in plan.chunks)
    holds = [f"{n_layers} layer{'s' if n_layers != 1 else ''}"]
    if len(plan.chunks) > 1:
        holds[0] += f" in {len(plan.chunks)} virtual chunks ({' + '.join(str(c.num_layers) for c in plan.chunks)})"
    if any(c.pre_process for c in plan.chunks):
        holds.append("embedding")
    if any(c.post_process for c in plan.chunks):
        holds.append("output layer and loss")
    shards = args.data_parallel_size * args.context_parallel_size
    instances = args.num_distributed_optimizer_instances
    sharding = f"DP x CP = {shards}" if instances == 1 else f"DP x CP / instances = {shards // instances}"
    conf = est["configured"]
    expert = f" ({plan.params.expert:,} of them routed-expert)" if plan.params.expert else ""
    full_args = _full_recompute_args(args)
    return [
        f"pipeline stage {plan.pp_rank} ({_ranks_text(plan.ranks)}; {'; '.join(holds)}):",
        f"  parameters per rank: {plan.params.total:,}{expert}",
        f"  weights {format_bytes(conf.weights)} | grads {format_bytes(conf.grads)}",
        f"  optimizer state: {format_bytes(est['optimizer dist=False'].optimizer)}, "
        f"{format_bytes(est['optimizer dist=True'].optimizer)} with --use-distributed-optimizer "
        f"(sharded over {sharding})",
        f"  activations: {format_bytes(est['recompute None'].activations)} without recompute, "
        f"{format_bytes(est['recompute selective'].activations)} selective, "
        f"{format_bytes(est['recompute full'].activations)} full "
        f"({full_args.recompute_method}, {full_args.recompute_num_layers or 1} layer(s) per group)",
        f"  total with this run's flags: {format_bytes(conf.total)}",
    ]


def dry_run_report(args, model_provider: Callable, flops_func: Optional[Callable] = None) -> str:
    """The whole report for validated ``args`` (with padded_vocab_size set); ``flops_func`` is the
    family's FLOP count (default: the dense GPT formula)."""
    from megatron.training.flops import num_floating_point_operations

    total, embedding = count_full_model(model_provider)
    plans = plan_stages(args, model_provider)
    flops = (flops_func or num_floating_point_operations)(args, args.global_batch_size)
    recompute = configured_recompute(args) or "none"
    lines = [
        f"dry run: planned for {args.world_size} rank(s); nothing was allocated or run",
        f"  model: {describe_model(args)}",
        f"  parameters: {total:,} total ({total / 1e9:.3f} B; embedding {embedding:,})",
        f"  layout: {describe_layout(args)}",
        f"  precision: {describe_precision(args)}; recompute: {recompute}",
        f"  FLOPs per iteration: {flops:.3e} ({flops / args.world_size / 1e12:.2f} TFLOP per GPU)",
        "estimated memory per GPU (peak of torch's allocator; the CUDA context and allocator "
        "fragmentation come on top):",
    ]
    for plan in plans:
        lines += stage_report(args, plan)
    return "\n".join(lines)


def prepare_args(args, args_defaults: Optional[Dict] = None):
    """Validate ``args`` (parsed, not yet validated) for --dry-run-world-size ranks (default
    WORLD_SIZE, else 1), install them as the global args and set the padded vocabulary."""
    from megatron.training.tokenizer import build_tokenizer, vocab_size_with_padding

    if dist.is_initialized():
        raise RuntimeError("--dry-run plans a run from one process: call it before torch.distributed is initialized")
    world = args.dry_run_world_size or int(os.getenv("WORLD_SIZE", "1") or 1)
    if world < 1:
        raise ValueError(f"--dry-run-world-size must be a positive number of ranks, got {world}")
    args.world_size = world
    args = validate_args(args, args_defaults or {}, world_size=world, rank=0)
    set_global_variables(args)
    tokenizer = build_tokenizer(args)
    set_tokenizer(tokenizer)
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args)
    return args


def dry_run(args, model_provider: Callable, args_defaults: Optional[Dict] = None,
            flops_func: Optional[Callable] = None) -> str:
    """Plan the run ``args`` (parsed, not yet validated) describe, print the report on rank 0
    (other ranks of a launcher print nothing) and return it."""
    args = prepare_args(args, args_defaults)
    report = dry_run_report(args, model_provider, flops_func)
    if int(os.getenv("RANK", "0") or 0) == 0:
        print(report, flush=True)
    return report
