"""Command-line validation: one function per topic, each raising ``ValueError``.

Every message names the flag (Megatron spelling), the value given, the rule and the fix.
These functions only read ``args``; derived values are computed by ``derived_args``.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Optional

from megatron.training.batch_size_schedule import check_step_batch_size_schedule
from megatron.training.phase_transitions import check_phase_transitions
from megatron.core.optimizer.optimizer_dtypes import check_precision_aware
from megatron.training.fake_process_group import check_fake_process_group
from megatron.training.fsdp2 import check_fsdp2
from megatron.training.cuda_graph_args import check_cuda_graphs
from megatron.training.upcycling import check_upcycling_args

logger = logging.getLogger(__name__)


def invalid(flag: str, value, rule: str, fix: str) -> ValueError:
    """The house error: ``--flag value: rule. Fix: fix.``"""
    return ValueError(f"{flag} {value!r}: {rule}. Fix: {fix}.")


def _positive(flag: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value <= 0:
        raise invalid(flag, value, "must be a positive integer", f"pass {flag} N with N >= 1")


def num_layers_of(args: argparse.Namespace) -> Optional[int]:
    """--num-layers, or --encoder-num-layers when only that was given."""
    return args.num_layers if args.num_layers is not None else args.encoder_num_layers


def check_parallel_layout(args: argparse.Namespace, world_size: int) -> None:
    """World size versus TP x PP x CP, the expert grid, and communication-feature needs."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp), ("--expert-model-parallel-size", ep),
                        ("--expert-tensor-parallel-size", args.expert_tensor_parallel_size)):
        _positive(flag, value)
    if world_size % (tp * pp * cp):
        raise invalid("--tensor-model-parallel-size", tp,
                      f"world size {world_size} is not divisible by TP x PP x CP = {tp}x{pp}x{cp} = {tp * pp * cp}",
                      "launch a multiple of TP*PP*CP processes or change the parallel sizes")
    etp = args.expert_tensor_parallel_size or tp
    if world_size % (etp * ep * pp):
        raise invalid("--expert-model-parallel-size", ep,
                      f"world size {world_size} is not divisible by ETP x EP x PP = {etp}x{ep}x{pp}",
                      "change --expert-model-parallel-size / --expert-tensor-parallel-size")
    if ep > 1 and not args.num_experts:
        raise invalid("--expert-model-parallel-size", ep, "expert parallelism needs experts",
                      "add --num-experts or use --expert-model-parallel-size 1")
    if ep > 1 and args.num_experts % ep:
        raise invalid("--num-experts", args.num_experts, f"not divisible by --expert-model-parallel-size {ep}",
                      "use a number of experts that is a multiple of the expert-parallel size")
    if args.hierarchical_context_parallel_sizes and math.prod(args.hierarchical_context_parallel_sizes) != cp:
        raise invalid("--hierarchical-context-parallel-sizes", args.hierarchical_context_parallel_sizes,
                      f"their product must equal --context-parallel-size {cp}", "fix the sizes")
    if any("a2a+p2p" in t for t in args.cp_comm_type) and not args.hierarchical_context_parallel_sizes:
        raise invalid("--cp-comm-type", args.cp_comm_type, "a2a+p2p needs hierarchical context-parallel groups",
                      "add --hierarchical-context-parallel-sizes")
    _check_communication_features(args)
    _check_distributed_optimizer_instances(args, world_size // (tp * pp), world_size // (etp * ep * pp))


def _check_distributed_optimizer_instances(args: argparse.Namespace, dp_cp: int, expert_dp: int) -> None:
    """--num-distributed-optimizer-instances N: the distributed optimizer, and N dividing the
    data x context parallel size and the expert data-parallel size."""
    flag, n = "--num-distributed-optimizer-instances", args.num_distributed_optimizer_instances
    _positive(flag, n, allow_none=False)
    if n == 1:
        return
    if not args.use_distributed_optimizer:
        raise invalid(flag, n, "instances of the distributed optimizer need --use-distributed-optimizer",
                      "add --use-distributed-optimizer, or drop the flag")
    if dp_cp % n:
        raise invalid(flag, n, f"the data x context parallel size {dp_cp} (world / (TP x PP)) is not divisible by "
                      "the number of instances", f"use a divisor of {dp_cp}, or change the number of ranks")
    if expert_dp % n:
        raise invalid(flag, n, f"the expert data-parallel size {expert_dp} (world / (ETP x EP x PP)) is not "
                      "divisible by the number of instances",
                      f"use a divisor of {expert_dp}, or change --expert-model-parallel-size")


def _check_communication_features(args: argparse.Namespace) -> None:
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise invalid("--overlap-param-gather", True, "needs the distributed optimizer",
                      "add --use-distributed-optimizer or drop --overlap-param-gather")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise invalid("--overlap-param-gather", True, "needs --overlap-grad-reduce", "add --overlap-grad-reduce")
    if args.overlap_param_gather_with_optimizer_step and not (
        args.use_distributed_optimizer and args.overlap_param_gather
    ):
        raise invalid("--overlap-param-gather-with-optimizer-step", True,
                      "needs --use-distributed-optimizer and --overlap-param-gather", "add both flags")
    if args.ddp_num_buckets is not None:
        _positive("--ddp-num-buckets", args.ddp_num_buckets)
        if args.ddp_bucket_size is not None:
            raise invalid("--ddp-num-buckets", args.ddp_num_buckets, "cannot be combined with --ddp-bucket-size",
                          "size the buckets with one of the two")
    if args.tp_comm_overlap and not (args.sequence_parallel and args.tensor_model_parallel_size > 1):
        raise invalid("--tp-comm-overlap", True, "needs --sequence-parallel with --tensor-model-parallel-size > 1",
                      "add --sequence-parallel and TP > 1, or drop --tp-comm-overlap")


def check_model_shape(args: argparse.Namespace) -> None:
    """Required sizes, heads and groups versus TP, sequence lengths, activation choice."""
    if args.num_layers is not None and args.encoder_num_layers is not None:
        raise invalid("--encoder-num-layers", args.encoder_num_layers, "cannot be combined with --num-layers",
                      "pass only --num-layers")
    required = (("--num-layers", num_layers_of(args)), ("--hidden-size", args.hidden_size),
                ("--num-attention-heads", args.num_attention_heads),
                ("--max-position-embeddings", args.max_position_embeddings))
    for flag, value in required:
        if value is None:
            raise invalid(flag, None, "is required", f"pass {flag} N")
        _positive(flag, value)
    for flag, value in (("--ffn-hidden-size", args.ffn_hidden_size), ("--kv-channels", args.kv_channels)):
        _positive(flag, value)
    heads, tp = args.num_attention_heads, args.tensor_model_parallel_size
    if heads % tp:
        raise invalid("--num-attention-heads", heads, f"not divisible by --tensor-model-parallel-size {tp}",
                      "use a tensor-parallel size that divides the number of heads")
    if args.kv_channels is None and args.hidden_size % heads:
        raise invalid("--hidden-size", args.hidden_size, f"not divisible by --num-attention-heads {heads}",
                      "change one of them, or give --kv-channels explicitly")
    if args.group_query_attention:
        _check_query_groups(args)
    _check_sequence_lengths(args)
    _check_context_parallel_attention(args)
    _check_architecture_choices(args)


def _check_query_groups(args: argparse.Namespace) -> None:
    groups, heads, tp = args.num_query_groups, args.num_attention_heads, args.tensor_model_parallel_size
    _positive("--num-query-groups", groups)
    if heads % groups:
        raise invalid("--num-query-groups", groups, f"must divide --num-attention-heads {heads}",
                      "choose a divisor of the number of heads")
    if groups % tp:
        # Megatron also accepts a tensor-parallel size that is a multiple of the groups, by
        # replicating key/value heads; the attention here does not replicate them yet
        # (docs/compatibility.md), and the model config would refuse it after startup.
        raise invalid("--num-query-groups", groups,
                      f"must be divisible by --tensor-model-parallel-size {tp} (each tensor-parallel rank "
                      "holds whole key/value groups; replicating them over ranks is not supported)",
                      "use a tensor-parallel size that divides the number of query groups")


def _check_sequence_lengths(args: argparse.Namespace) -> None:
    if args.seq_length is not None and args.encoder_seq_length is not None:
        raise invalid("--encoder-seq-length", args.encoder_seq_length, "cannot be combined with --seq-length",
                      "pass only --seq-length")
    seq = args.seq_length if args.seq_length is not None else args.encoder_seq_length
    if seq is None:
        raise invalid("--seq-length", None, "is required", "pass --seq-length N")
    _positive("--seq-length", seq)
    for flag, length in (("--seq-length", seq), ("--decoder-seq-length", args.decoder_seq_length)):
        if length is not None and args.max_position_embeddings < length:
            raise invalid(flag, length, f"exceeds --max-position-embeddings {args.max_position_embeddings}",
                          f"raise --max-position-embeddings to at least {length}")
    cp = args.context_parallel_size
    if cp > 1 and seq % (2 * cp):
        raise invalid("--seq-length", seq, f"must be a multiple of 2 x --context-parallel-size = {2 * cp}",
                      "pad the sequence length or change the context-parallel size")


def _check_context_parallel_attention(args: argparse.Namespace) -> None:
    """What context-parallel attention supports: comm types, head split, masks."""
    cp = args.context_parallel_size
    if cp == 1:
        return
    known = ("p2p", "all_gather", "allgather", "a2a", "a2a+p2p")
    types = list(args.cp_comm_type or ["p2p"])
    for name in types:
        if name not in known:
            raise invalid("--cp-comm-type", name, f"is not one of {', '.join(known)}", "pick one of those")
    layers = num_layers_of(args)
    if len(types) > 1 and layers is not None and len(types) != layers:
        raise invalid("--cp-comm-type", types, f"needs one value or one per layer ({layers})",
                      "give a single comm type or exactly --num-layers values")
    sizes = args.hierarchical_context_parallel_sizes
    if "a2a+p2p" in types and (sizes is None or len(sizes) != 2):
        raise invalid("--hierarchical-context-parallel-sizes", sizes, "a2a+p2p needs two sizes (a2a, p2p)",
                      f"pass e.g. --hierarchical-context-parallel-sizes 2 {cp // 2}")
    heads = args.num_attention_heads // args.tensor_model_parallel_size
    for name, a2a in (("a2a", cp), ("a2a+p2p", (sizes or [1])[0])):
        if name in types and heads % a2a:
            raise invalid("--num-attention-heads", args.num_attention_heads,
                          f"heads per tensor-parallel rank ({heads}) must be divisible by the all-to-all "
                          f"context-parallel size {a2a} for --cp-comm-type {name}",
                          "change the head count, the CP size or the comm type")
    if args.reset_attention_mask:
        raise invalid("--reset-attention-mask", True, "is not supported with --context-parallel-size > 1",
                      "drop --reset-attention-mask or use --context-parallel-size 1")


def _check_architecture_choices(args: argparse.Namespace) -> None:
    chosen = [f for f, on in (("--swiglu", args.swiglu), ("--squared-relu", args.squared_relu),
                              ("--openai-gelu", args.openai_gelu), ("--quick-geglu", args.quick_geglu)) if on]
    if len(chosen) > 1:
        raise invalid(chosen[1], True, f"cannot be combined with {chosen[0]}", "choose one MLP activation")
    if args.window_size is not None and (len(args.window_size) != 2 or min(args.window_size) < -1):
        raise invalid("--window-size", args.window_size, "must be two integers (left, right)",
                      "pass e.g. --window-size 4096,0")
    if not 0.0 < args.rotary_percent <= 1.0:
        raise invalid("--rotary-percent", args.rotary_percent, "must be in (0, 1]", "pass a fraction such as 0.5")
    rotary = args.position_embedding_type in ("rope", "yarn", "mrope") or args.use_rotary_position_embeddings
    if args.no_rope_freq is not None and not rotary:
        raise invalid("--no-rope-freq", args.no_rope_freq, "chooses layers that skip the rotary embedding, and "
                      f"--position-embedding-type {args.position_embedding_type} has none",
                      "add --position-embedding-type rope, or drop --no-rope-freq")
    if args.num_experts:
        if not 1 <= args.moe_router_topk <= args.num_experts:
            raise invalid("--moe-router-topk", args.moe_router_topk,
                          f"must be between 1 and --num-experts {args.num_experts}", "lower --moe-router-topk")


def check_batch_sizes(args: argparse.Namespace, data_parallel_size: int) -> None:
    """Micro/global batch sizes, the batch-size ramp and the step schedule."""
    check_step_batch_size_schedule(args)
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if mbs is None:
        raise invalid("--micro-batch-size", None, "is required", "pass --micro-batch-size N")
    _positive("--micro-batch-size", mbs)
    _positive("--global-batch-size", gbs)
    step = mbs * data_parallel_size
    if gbs is not None and gbs % step and not args.decrease_batch_size_if_needed:
        raise invalid("--global-batch-size", gbs,
                      f"must be a multiple of --micro-batch-size x data-parallel size = {mbs}x{data_parallel_size}"
                      f" = {step}", f"use a multiple of {step}, or add --decrease-batch-size-if-needed")
    if args.rampup_batch_size is not None:
        start, incr, samples = args.rampup_batch_size
        final = gbs if gbs is not None else step
        if start <= 0 or incr <= 0 or samples < 0:
            raise invalid("--rampup-batch-size", args.rampup_batch_size,
                          "start and increment must be positive and samples non-negative", "fix the three values")
        if start > final or (final - start) % incr:
            raise invalid("--rampup-batch-size", args.rampup_batch_size,
                          f"the ramp from {start} in steps of {incr} must land exactly on the global batch size "
                          f"{final}",
                          "choose a start and increment that reach --global-batch-size")


def check_training_schedule(args: argparse.Namespace) -> None:
    """Run length and the learning-rate / weight-decay schedules."""
    if args.train_iters is not None and args.train_samples is not None:
        raise invalid("--train-samples", args.train_samples, "cannot be combined with --train-iters",
                      "use iteration-based or sample-based training, not both")
    _positive("--train-iters", args.train_iters)
    _positive("--train-samples", args.train_samples)
    check_phase_transitions(args)
    if args.manual_gc_interval < 0:
        raise invalid("--manual-gc-interval", args.manual_gc_interval, "must be >= 0",
                      "pass the number of iterations between collections, or 0 for none during training")
    if args.train_iters is not None:
        for flag, value, unset in (("--lr-decay-samples", args.lr_decay_samples, None),
                                   ("--lr-warmup-samples", args.lr_warmup_samples, 0),
                                   ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples, None),
                                   ("--rampup-batch-size", args.rampup_batch_size, None)):
            if value != unset:
                raise invalid(flag, value, "is sample-based but training is iteration-based (--train-iters)",
                              f"drop {flag} or train with --train-samples")
    if args.train_samples is not None:
        for flag, value, unset in (("--lr-decay-iters", args.lr_decay_iters, None),
                                   ("--lr-warmup-iters", args.lr_warmup_iters, 0),
                                   ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters, None)):
            if value != unset:
                raise invalid(flag, value, "is iteration-based but training is sample-based (--train-samples)",
                              f"drop {flag} or train with --train-iters")
    _check_warmup(args)
    _check_lr_values(args)
    _check_weight_decay(args)
    for flag, value in (("--log-interval", args.log_interval), ("--exit-interval", args.exit_interval),
                        ("--eval-interval", args.eval_interval)):
        _positive(flag, value)


def _check_warmup(args: argparse.Namespace) -> None:
    given = [flag for flag, on in (("--lr-warmup-fraction", args.lr_warmup_fraction is not None),
                                   ("--lr-warmup-iters", args.lr_warmup_iters != 0),
                                   ("--lr-warmup-samples", args.lr_warmup_samples != 0)) if on]
    if len(given) > 1:
        raise invalid(given[1], getattr(args, given[1][2:].replace("-", "_")),
                      f"cannot be combined with {given[0]}", "give only one way of specifying warmup")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction <= 1.0:
        raise invalid("--lr-warmup-fraction", args.lr_warmup_fraction, "must be in [0, 1]", "pass a fraction")
    if args.lr_warmup_iters < 0 or args.lr_warmup_samples < 0:
        raise invalid("--lr-warmup-iters", args.lr_warmup_iters, "warmup lengths cannot be negative", "use >= 0")


def _check_lr_values(args: argparse.Namespace) -> None:
    if args.lr is not None and args.min_lr > args.lr:
        raise invalid("--min-lr", args.min_lr, f"is larger than --lr {args.lr}", "use --min-lr <= --lr")
    if (args.decoupled_lr is not None and args.decoupled_min_lr is not None
            and args.decoupled_min_lr > args.decoupled_lr):
        raise invalid("--decoupled-min-lr", args.decoupled_min_lr, f"is larger than --decoupled-lr {args.decoupled_lr}",
                      "use --decoupled-min-lr <= --decoupled-lr")
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None and args.lr_wsd_decay_samples is None:
        raise invalid("--lr-decay-style", "WSD", "needs the length of the annealing phase",
                      "add --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")


def _check_weight_decay(args: argparse.Namespace) -> None:
    style = args.weight_decay_incr_style
    if style == "constant":
        for flag, value in (("--start-weight-decay", args.start_weight_decay),
                            ("--end-weight-decay", args.end_weight_decay)):
            if value is not None:
                raise invalid(flag, value, "is only used with a non-constant --weight-decay-incr-style",
                              "use --weight-decay, or add --weight-decay-incr-style linear/cosine")
    elif args.start_weight_decay is None or args.end_weight_decay is None:
        raise invalid("--weight-decay-incr-style", style, "needs --start-weight-decay and --end-weight-decay",
                      "give both values")


def check_precision(args: argparse.Namespace) -> None:
    """fp16/bf16 exclusivity and the flags that need one of them."""
    if args.fp16 and args.bf16:
        raise invalid("--bf16", True, "cannot be combined with --fp16", "choose one of --fp16 and --bf16")
    if args.fp16_lm_cross_entropy and not args.fp16:
        raise invalid("--fp16-lm-cross-entropy", True, "needs --fp16", "add --fp16 or drop the flag")
    if args.fp32_residual_connection and not (args.fp16 or args.bf16):
        raise invalid("--fp32-residual-connection", True, "needs --fp16 or --bf16",
                      "add a reduced precision or drop the flag (fp32 training keeps fp32 residuals anyway)")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise invalid("--loss-scale", args.loss_scale, "must be positive", "pass a positive scale or drop it")
    for flag, value in (("--initial-loss-scale", args.initial_loss_scale), ("--min-loss-scale", args.min_loss_scale)):
        if value <= 0:
            raise invalid(flag, value, "must be positive", "pass a positive value")
    check_precision_aware(args)
    check_fp8_param_gather(args)


def check_fp8_param_gather(args: argparse.Namespace) -> None:
    """--fp8-param-gather: FP8 weights gathered in FP8 by the distributed optimizer (docs/fp8.md)."""
    if not args.fp8_param_gather:
        return
    if args.fp8 is None:
        raise invalid("--fp8-param-gather", True, "keeps and gathers the FP8 linears' weights in FP8, so it needs "
                      "FP8 training", "add --fp8-format hybrid (or e4m3), or drop --fp8-param-gather")
    if args.use_torch_fsdp2:
        raise invalid("--fp8-param-gather", True, "is implemented for the distributed optimizer's param gather; "
                      "FSDP2 gathers params in their own dtype here",
                      "use --use-distributed-optimizer instead of --use-torch-fsdp2, or drop --fp8-param-gather")
    if not args.use_distributed_optimizer:
        raise invalid("--fp8-param-gather", True, "needs --use-distributed-optimizer (the FP8 weights are "
                      "quantized from its master shards and all-gathered by it)",
                      "add --use-distributed-optimizer or drop --fp8-param-gather")
    if args.use_precision_aware_optimizer:
        raise invalid("--fp8-param-gather", True, "is not combined with --use-precision-aware-optimizer here (the "
                      "FP8 weights are quantized from the default optimizer's fp32 master copies)",
                      "drop one of the two flags")
    if args.cuda_graph_impl == "full_iteration" or "full_iteration" in (args.cuda_graph_scope or []):
        raise invalid("--fp8-param-gather", True, "is not captured by full-iteration CUDA graphs (the gathered "
                      "FP8 weights are handed to the linears on the host)",
                      "drop --cuda-graph-impl or --fp8-param-gather")


def check_recompute(args: argparse.Namespace) -> None:
    """Activation recompute options (Megatron's TransformerConfig rules)."""
    granularity = args.recompute_granularity
    if args.recompute_activations:
        if granularity == "full":
            raise invalid("--recompute-activations", True, "means selective recompute but "
                          "--recompute-granularity is full", "drop one of the two flags")
        granularity = "selective"
    if granularity is None:
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            logger.warning("--recompute-method/--recompute-num-layers are ignored without --recompute-granularity")
    elif granularity == "selective":
        if args.recompute_method is not None:
            raise invalid("--recompute-method", args.recompute_method, "is not used by selective recompute",
                          "drop --recompute-method or use --recompute-granularity full")
        if args.recompute_num_layers is not None:
            raise invalid("--recompute-num-layers", args.recompute_num_layers, "is not used by selective recompute",
                          "drop --recompute-num-layers or use --recompute-granularity full")
    else:
        if args.recompute_method is None:
            raise invalid("--recompute-granularity", "full", "needs --recompute-method",
                          "add --recompute-method uniform (or block)")
        per_stage = num_layers_of(args) // args.pipeline_model_parallel_size
        layers = args.recompute_num_layers
        if layers is None or not 1 <= layers <= max(per_stage, 1):
            raise invalid("--recompute-num-layers", layers,
                          f"full recompute needs a value between 1 and the layers per pipeline stage ({per_stage})",
                          "pass --recompute-num-layers N")
    if args.distribute_saved_activations:
        if args.tensor_model_parallel_size == 1 or granularity != "full" or args.recompute_method is None:
            raise invalid("--distribute-saved-activations", True,
                          "needs --tensor-model-parallel-size > 1 and full recompute with a --recompute-method",
                          "add those flags or drop --distribute-saved-activations")
        if args.sequence_parallel:
            raise invalid("--distribute-saved-activations", True,
                          "cannot be combined with --sequence-parallel (the saved input is already split)",
                          "drop one of the two flags")


def check_pipeline(args: argparse.Namespace) -> None:
    """Layer split over pipeline stages, uneven first/last stages, and virtual pipeline rules."""
    pp = args.pipeline_model_parallel_size
    layers = num_layers_of(args) + int(args.account_for_embedding_in_pipeline_split) \
        + int(args.account_for_loss_in_pipeline_split)
    by_layers, by_stages = args.num_layers_per_virtual_pipeline_stage, args.num_virtual_stages_per_pipeline_rank
    if by_layers is not None and by_stages is not None:
        raise invalid("--num-virtual-stages-per-pipeline-rank", by_stages,
                      "cannot be combined with --num-layers-per-virtual-pipeline-stage", "give only one of them")
    _positive("--num-layers-per-virtual-pipeline-stage", by_layers)
    _positive("--num-virtual-stages-per-pipeline-rank", by_stages)
    _positive("--microbatch-group-size-per-virtual-pipeline-stage",
              args.microbatch_group_size_per_virtual_pipeline_stage)
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    if first is not None or last is not None:
        _check_uneven_pipeline(args, layers, first, last)
    elif layers % pp:
        raise invalid("--num-layers", num_layers_of(args),
                      f"the layer count{_accounted(args)} ({layers}) is not divisible by "
                      f"--pipeline-model-parallel-size {pp}",
                      "change the number of layers or the pipeline size, or use "
                      "--decoder-first/last-pipeline-num-layers")
    vpp = virtual_pipeline_size(args)
    if vpp is not None and vpp > 1:
        if args.overlap_p2p_comm and pp < 2:
            raise invalid("--pipeline-model-parallel-size", pp, "the interleaved (virtual) pipeline needs PP > 1",
                          "raise the pipeline size or drop the virtual-pipeline flag")
        if not args.overlap_p2p_comm and pp < 3:
            raise invalid("--pipeline-model-parallel-size", pp,
                          "the interleaved pipeline without p2p overlap needs PP > 2",
                          "raise the pipeline size or drop --no-overlap-p2p-communication")
    elif args.overlap_param_gather_with_optimizer_step:
        raise invalid("--overlap-param-gather-with-optimizer-step", True, "needs the interleaved pipeline",
                      "add --num-virtual-stages-per-pipeline-rank or drop the flag")


def check_interleaved_schedule(args: argparse.Namespace, data_parallel_size: int) -> None:
    """Micro-batch grouping of the interleaved schedule (megatron-facts section 10):
    PP <= G <= M, and M % G is 0 or at least PP (else "dependency bubbles")."""
    if not virtual_pipeline_size(args) or args.rampup_batch_size is not None \
            or args.step_batch_size_schedule is not None:
        return
    pp = args.pipeline_model_parallel_size
    gbs = args.global_batch_size or args.micro_batch_size * data_parallel_size
    m = gbs // (args.micro_batch_size * data_parallel_size)
    g = args.microbatch_group_size_per_virtual_pipeline_stage or pp
    flag = "--microbatch-group-size-per-virtual-pipeline-stage"
    if g < pp:
        raise invalid(flag, g, f"the interleaved schedule needs a group of at least PP = {pp} micro-batches",
                      f"use {pp} or more (the default is PP)")
    if m < g:
        raise invalid("--global-batch-size", gbs,
                      f"gives {m} micro-batch(es) per step, fewer than the interleaved schedule's group of {g}",
                      f"use a global batch size of at least {g * args.micro_batch_size * data_parallel_size} "
                      f"or a smaller {flag}")
    if 0 < m % g < pp:
        raise invalid("--global-batch-size", gbs,
                      f"gives {m} micro-batches, leaving a last group of {m % g} (fewer than PP = {pp}) "
                      "in the interleaved schedule, which creates dependency bubbles",
                      f"use a number of micro-batches divisible by {flag} {g}, or a last group of at least PP")


def _accounted(args: argparse.Namespace) -> str:
    extra = [n for n, on in (("embedding", args.account_for_embedding_in_pipeline_split),
                             ("loss", args.account_for_loss_in_pipeline_split)) if on]
    return f" (+1 for {' and '.join(extra)})" if extra else ""


def _check_uneven_pipeline(args: argparse.Namespace, layers: int, first, last) -> None:
    pp = args.pipeline_model_parallel_size
    flag = "--decoder-first-pipeline-num-layers" if first is not None else "--decoder-last-pipeline-num-layers"
    if pp == 1:
        raise invalid(flag, first if first is not None else last, "needs --pipeline-model-parallel-size > 1",
                      "drop the flag or raise the pipeline size")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise invalid("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage,
                      "cannot be used with an uneven pipeline", "use --num-virtual-stages-per-pipeline-rank")
    for name, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        _positive(name, value)
    middle_layers = layers - (first or 0) - (last or 0)
    middle_stages = pp - int(first is not None) - int(last is not None)
    vpp = args.num_virtual_stages_per_pipeline_rank or 1
    for name, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if value is not None and value % vpp:
            raise invalid(name, value, f"the stage's layers must split evenly over its {vpp} virtual stages",
                          "use a multiple of --num-virtual-stages-per-pipeline-rank")
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
        middle_stages and middle_layers % (middle_stages * vpp)
    ):
        raise invalid(flag, first if first is not None else last,
                      f"the remaining {middle_layers} layers cannot be split evenly over the remaining "
                      f"{middle_stages} stage(s) x {vpp} virtual stage(s)",
                      "change the first/last stage layer counts")


def virtual_pipeline_size(args: argparse.Namespace) -> Optional[int]:
    """Model chunks per pipeline rank implied by the VPP flags (None without VPP or when 1).

    Raises when --num-layers-per-virtual-pipeline-stage does not divide the layers per stage.
    """
    pp = args.pipeline_model_parallel_size
    layers = num_layers_of(args) + int(args.account_for_embedding_in_pipeline_split) \
        + int(args.account_for_loss_in_pipeline_split)
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise invalid("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage,
                          f"must divide the layers per pipeline stage ({per_stage})",
                          "choose a divisor of num-layers / pipeline size")
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    elif args.num_virtual_stages_per_pipeline_rank is not None:
        vpp = args.num_virtual_stages_per_pipeline_rank
        uneven = args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None
        if not uneven and layers % (pp * vpp):
            raise invalid("--num-virtual-stages-per-pipeline-rank", vpp,
                          f"the {layers} layers are not divisible by PP x VPP = {pp}x{vpp}",
                          "choose a number of virtual stages that splits the layers evenly")
    else:
        return None
    return vpp if vpp > 1 else None


def check_checkpointing(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Save interval, retention, format compatibility and non-persistent checkpoints."""
    if args.save is not None and (args.save_interval is None or args.save_interval <= 0):
        raise invalid("--save-interval", args.save_interval, "--save needs a positive save interval",
                      "add --save-interval N")
    if args.save_retain_interval is not None:
        _positive("--save-retain-interval", args.save_retain_interval)
        if args.save_interval and args.save_retain_interval % args.save_interval:
            raise invalid("--save-retain-interval", args.save_retain_interval,
                          f"must be a multiple of --save-interval {args.save_interval}", "use a multiple")
    _positive("--keep-last-checkpoints", args.keep_last_checkpoints)
    check_fsdp2(args)
    if args.async_save and args.ckpt_format == "torch":
        raise invalid("--async-save", True, "is not available for --ckpt-format torch",
                      "use --ckpt-format torch_dist or drop --async-save")
    check_non_persistent_checkpoints(args, world_size)
    if args.load_main_params_from_ckpt and not args.no_load_optim:
        raise invalid("--load-main-params-from-ckpt", True, "reads the fp32 main params without the rest of the "
                      "optimizer state (a full --load restores them anyway)", "add --no-load-optim")
    if args.ckpt_convert_format is not None and args.ckpt_convert_save is None:
        raise invalid("--ckpt-convert-format", args.ckpt_convert_format, "needs an output directory",
                      "add --ckpt-convert-save DIR")
    if args.ckpt_convert_format is not None and args.load is None:
        raise invalid("--ckpt-convert-format", args.ckpt_convert_format, "converts the checkpoint under --load",
                      "add --load DIR")


def check_non_persistent_checkpoints(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """--non-persistent-save-interval, --non-persistent-ckpt-type and its directories,
    --replication and its group shape (checked against ``world_size`` when given)."""
    kind = args.non_persistent_ckpt_type
    if kind == "local" and not args.non_persistent_local_ckpt_dir:
        raise invalid("--non-persistent-ckpt-type", kind, "needs a directory on each node for the ranks' files",
                      "add --non-persistent-local-ckpt-dir DIR (node-local storage, e.g. a local SSD)")
    if kind != "local" and args.non_persistent_local_ckpt_dir:
        logger.warning("--non-persistent-local-ckpt-dir is used only with --non-persistent-ckpt-type local: ignored")
    check_replication(args, world_size)
    if args.non_persistent_save_interval is None:
        return
    _positive("--non-persistent-save-interval", args.non_persistent_save_interval)
    if kind is None:
        raise invalid("--non-persistent-save-interval", args.non_persistent_save_interval,
                      "needs the kind of non-persistent checkpoint",
                      "add --non-persistent-ckpt-type global (or local, or in_memory)")
    if args.save is None:
        where = {"global": "the checkpoints go to DIR/non_persistent unless --non-persistent-global-ckpt-dir says "
                           "otherwise", "local": "persistent checkpoints go there; the local ones to "
                           "--non-persistent-local-ckpt-dir", "in_memory": "persistent checkpoints go there; "
                           "the in-memory ones are found by it"}[kind]
        raise invalid("--non-persistent-save-interval", args.non_persistent_save_interval,
                      "saves nothing without --save", f"add --save DIR ({where})")


def check_replication(args: argparse.Namespace, world_size: Optional[int]) -> None:
    """--replication needs local non-persistent checkpoints and a group shape that tiles the world."""
    if not args.replication:
        if args.replication_jump is not None:
            logger.warning("--replication-jump is used only with --replication: ignored")
        return
    if args.non_persistent_ckpt_type != "local":
        raise invalid("--replication", True, "replicates node-local non-persistent checkpoints, and "
                      f"--non-persistent-ckpt-type is {args.non_persistent_ckpt_type}",
                      "add --non-persistent-ckpt-type local --non-persistent-local-ckpt-dir DIR, or drop --replication")
    if args.replication_jump is None:
        raise invalid("--replication", True, "needs the spacing between a rank and its replication partners",
                      "add --replication-jump J (usually the number of ranks per node)")
    _positive("--replication-jump", args.replication_jump)
    if not isinstance(args.replication_factor, int) or args.replication_factor < 2:
        raise invalid("--replication-factor", args.replication_factor, "must be at least 2 (the rank and one copy)",
                      "pass --replication-factor 2 or more, or drop --replication")
    group = args.replication_jump * args.replication_factor
    if world_size is not None and world_size % group:
        raise invalid("--replication-jump", args.replication_jump,
                      f"times --replication-factor {args.replication_factor} ({group}) must divide the world size "
                      f"{world_size} (the ranks form groups n, n+J, ..., n+(F-1)J)",
                      "choose J and F whose product divides the number of ranks")


def check_data(args: argparse.Namespace) -> None:
    """Only one source of the dataset blend; loader settings."""
    if args.data_path is not None and args.data_args_path is not None:
        raise invalid("--data-args-path", args.data_args_path, "cannot be combined with --data-path",
                      "give the blend one way")
    per_split = any(p is not None for p in (args.train_data_path, args.valid_data_path, args.test_data_path))
    if per_split and args.per_split_data_args_path is not None:
        raise invalid("--per-split-data-args-path", args.per_split_data_args_path,
                      "cannot be combined with --train/valid/test-data-path", "give the per-split blends one way")
    if per_split and (args.data_path is not None or args.data_args_path is not None):
        raise invalid("--train-data-path", args.train_data_path, "cannot be combined with --data-path",
                      "use --data-path with --split, or the per-split paths")
    if args.num_workers < 0:
        raise invalid("--num-workers", args.num_workers, "cannot be negative", "use 0 or more")
    if not args.data_sharding and args.dataloader_type != "cyclic" and args.rank == 0:
        logger.warning("--no-data-sharding has no effect without --dataloader-type cyclic: the sequential "
                       "order already deals each global batch out to the data-parallel ranks")


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Run every check; raises the first ValueError found. Reads ``args`` only."""
    check_parallel_layout(args, world_size)
    check_model_shape(args)
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    check_batch_sizes(args, world_size // (tp * pp * cp))
    check_training_schedule(args)
    check_precision(args)
    check_recompute(args)
    check_pipeline(args)
    check_interleaved_schedule(args, world_size // (tp * pp * cp))
    check_checkpointing(args, world_size)
    check_fake_process_group(args, world_size)
    check_data(args)
    check_cuda_graphs(args)
    check_upcycling_args(args)
