"""Estimated GPU memory of one rank: weights, gradients, optimizer state and activations.

Pure arithmetic on the validated flags and on what a rank holds (its parameter counts and the
layers of its model chunks); nothing here touches a device. The start-up summary and the dry
run (``dry_run.py``) print these numbers; ``benchmarks/memory_estimate_check.py`` compares
them with ``torch.cuda.max_memory_allocated`` on a GPU. docs/dry_run.md derives every term.

Notation: s = --seq-length, b = --micro-batch-size, h = --hidden-size, f = --ffn-hidden-size,
n = heads, g = query groups, d = kv channels, V = padded vocabulary, tp/cp/pp/dp the parallel
sizes, sp = tp with --sequence-parallel (else 1), a = bytes of an activation element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

GiB = float(1 << 30)


@dataclass(frozen=True)
class ChunkShape:
    """One model chunk of a rank: its transformer layers, and whether it holds the embedding
    (first virtual stage) and the output layer with the loss (last virtual stage)."""

    num_layers: int
    pre_process: bool
    post_process: bool


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one rank. ``expert`` are routed-expert weights (replicated over the
    expert data-parallel group); ``dense`` are all the others (replicated over DP x CP)."""

    dense: int
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank, by component."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def param_bytes(args) -> int:
    """Bytes of a model parameter: 2 with --bf16/--fp16, else 4."""
    return 2 if (args.bf16 or args.fp16) else 4


def grad_bytes(args) -> int:
    """Bytes of a gradient element in the data-parallel grad buffer: fp32 main grads when the
    parameters are fp32 or grads are accumulated in fp32 (the default with --bf16)."""
    if param_bytes(args) == 4 or args.accumulate_allreduce_grads_in_fp32:
        return 4
    return 2


_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def optimizer_bytes_per_param(args) -> float:
    """Device bytes of the main copy of half-precision params, plus Adam's two moments or
    SGD's or Lion's momentum: fp32, or the --main-params-dtype / --exp-avg-dtype / --exp-avg-sq-dtype
    of the precision-aware optimizer; with --optimizer-cpu-offload only the share left on
    the device (per-tensor scales are negligible)."""
    if not args.use_precision_aware_optimizer:
        main = 4 if param_bytes(args) == 2 else 0
        return float(main + (8 if args.optimizer == "adam" else 4))
    main = _DTYPE_BYTES[args.main_params_dtype] if param_bytes(args) == 2 else 0
    per_param = main + _DTYPE_BYTES[args.exp_avg_dtype] + _DTYPE_BYTES[args.exp_avg_sq_dtype]
    return per_param * (1.0 - args.optimizer_offload_fraction if args.optimizer_cpu_offload else 1.0)


def expert_data_parallel_size(args) -> int:
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    ep = args.expert_model_parallel_size or 1
    return max(1, args.world_size // (etp * ep * args.pipeline_model_parallel_size))


def static_memory(args, params: RankParams, distributed_optimizer: bool):
    """(weights, grads, optimizer state) in bytes. The distributed optimizer shards the
    optimizer state of dense params over DP x CP and of expert params over expert DP."""
    weights = params.total * param_bytes(args)
    grads = params.total * grad_bytes(args)
    per_param = optimizer_bytes_per_param(args)
    if distributed_optimizer:
        dense_shards = args.data_parallel_size * args.context_parallel_size
        optimizer = per_param * (params.dense / dense_shards + params.expert / expert_data_parallel_size(args))
    else:
        optimizer = per_param * params.total
    return float(weights), float(grads), float(optimizer)


def fsdp2_static_memory(args, params: RankParams):
    """(weights, grads, optimizer state) in bytes under --use-torch-fsdp2: fp32 weight and
    gradient shards and the optimizer's states (no separate main copy), all over DP x CP.
    The layer being gathered (bf16 weights and grads of one or two layers) is not counted."""
    shards = args.data_parallel_size * args.context_parallel_size
    states = 8 if args.optimizer == "adam" else 4
    return 4.0 * params.total / shards, 4.0 * params.total / shards, float(states * params.total / shards)


def activation_bytes(args) -> int:
    return 2 if (args.bf16 or args.fp16) else 4


def _sp(args) -> int:
    return args.tensor_model_parallel_size if args.sequence_parallel else 1


def _tokens(args) -> float:
    """Tokens of one micro-batch on one rank: s/cp x b."""
    return args.seq_length / args.context_parallel_size * args.micro_batch_size


def layer_activation_bytes(args, selective: bool = False) -> float:
    """Bytes one transformer layer keeps for backward per micro-batch, without recompute
    or with ``selective`` (core attention) recompute.

    Saved tensors (elements per token): the two norms' inputs and outputs (4h/sp, the
    outputs being the QKV and FC1 inputs; the fused CUDA norms keep no fp32 copy), the QKV
    output (n d + 2 g d)/tp (q, k, v are views of it), with rotary embeddings the rotated
    q and k, (n d + g d)/tp, the attention output (input of the output projection, n d/tp), FC1's output
    (f/tp, 2f/tp gated), the activation's output (FC2's input, f/tp; gated adds the
    silu output, f/tp), and one byte per element of each dropout mask; in fp32, the norms'
    1/rms (2/sp) and attention's log-sum-exp (n/tp), which selective recompute does not keep
    (its checkpoint's inputs, q/k/v, and output, the projection's input, are kept anyway).
    """
    tp, sp, a = args.tensor_model_parallel_size, _sp(args), activation_bytes(args)
    h, f = args.hidden_size, args.ffn_hidden_size
    n, d = args.num_attention_heads, args.kv_channels
    g = args.num_query_groups if args.group_query_attention else n
    gated = args.swiglu
    norms = 4 * h / sp
    attention = (n * d + 2 * g * d + n * d) / tp
    if args.position_embedding_type in ("rope", "yarn", "mrope"):
        # the rotated q and k are new tensors; v stays a view that keeps the QKV output alive
        attention += (n * d + g * d) / tp
    mlp = (4 * f if gated else 2 * f) / tp
    per_token = a * (norms + attention + mlp) + 8 / sp  # + the norms' fp32 1/rms per token
    if not selective:
        per_token += 4 * n / tp  # attention's fp32 log-sum-exp, dropped by selective recompute
    if args.hidden_dropout > 0:
        per_token += 2 * h / sp  # two bool masks
    return per_token * _tokens(args)


def layer_input_bytes(args) -> float:
    """A layer's input [s/(cp sp), b, h]: all that full recompute keeps per checkpointed group."""
    return activation_bytes(args) * args.hidden_size / _sp(args) * _tokens(args)


def output_layer_bytes(args) -> float:
    """The last stage's head per micro-batch: final norm input and output (2h/sp, a bytes)
    and the fp32 softmax of the vocabulary-parallel cross entropy (4 V/tp)."""
    tp, a = args.tensor_model_parallel_size, activation_bytes(args)
    return _tokens(args) * (a * 2 * args.hidden_size / _sp(args) + 4 * args.padded_vocab_size / tp)


def logits_transient_bytes(args) -> float:
    """Half-precision logits (forward) or their gradient (backward) next to the fp32
    softmax: a V/tp per token, alive for one micro-batch at the peak."""
    return _tokens(args) * activation_bytes(args) * args.padded_vocab_size / args.tensor_model_parallel_size


def num_microbatches(args) -> int:
    return max(1, args.global_batch_size // (args.micro_batch_size * args.data_parallel_size))


def in_flight_microbatches(args, pp_rank: int, num_chunks: int) -> int:
    """Chunk-micro-batches whose activations a rank holds at its peak (the closed form of
    what ``peak_in_flight_bytes`` finds by walking the schedule, for the default group size).

    No pipeline: 1 (each micro-batch runs forward and backward before the next).
    1F1B: pp - pp_rank (the warm-up forwards plus one), at most the micro-batch count.
    Interleaved (vpp chunks): 2 (pp - pp_rank - 1) + (vpp - 1) pp warm-up forwards plus one,
    at most micro-batches x vpp.
    """
    pp, m = args.pipeline_model_parallel_size, num_microbatches(args)
    if pp == 1:
        return 1
    if num_chunks <= 1:
        return min(pp - pp_rank, m)
    return min(2 * (pp - pp_rank - 1) + (num_chunks - 1) * pp + 1, m * num_chunks)


def _chunk_layers_bytes(args, num_layers: int, recompute: Optional[str]) -> tuple:
    """(bytes kept per micro-batch, bytes of the one recomputed group alive during backward)."""
    full = layer_activation_bytes(args, selective=recompute == "selective")
    if recompute != "full" or num_layers == 0:
        return num_layers * full, 0.0
    group = max(1, args.recompute_num_layers or 1)
    if args.recompute_method == "block":
        recomputed = min(group, num_layers)
        return recomputed * layer_input_bytes(args) + (num_layers - recomputed) * full, full
    groups = math.ceil(num_layers / group)
    return groups * layer_input_bytes(args), min(group, num_layers) * full


def peak_in_flight_bytes(args, pp_rank: int, kept_per_chunk: Sequence[float]) -> float:
    """The most activation bytes alive at once on ``pp_rank``, walking the rank's own pipeline
    schedule (``schedule_table``: a forward of chunk c adds ``kept_per_chunk[c]``, its
    backward frees it). Without a pipeline, one micro-batch at a time."""
    from megatron.core.pipeline_parallel.schedule_table import schedule_table

    pp = args.pipeline_model_parallel_size
    if pp == 1:
        return float(sum(kept_per_chunk))
    vpp = len(kept_per_chunk) if len(kept_per_chunk) > 1 else None
    group = args.microbatch_group_size_per_virtual_pipeline_stage if vpp else None
    live = peak = 0.0
    for kind, _, chunk in schedule_table(pp, pp_rank, num_microbatches(args), vpp, group):
        live += kept_per_chunk[chunk] if kind == "F" else -kept_per_chunk[chunk]
        peak = max(peak, live)
    return peak


def activation_memory(args, chunks: Sequence[ChunkShape], pp_rank: int, recompute: Optional[str]) -> float:
    """Peak activation bytes of a rank holding ``chunks``; ``recompute`` None, "selective"
    (core attention only: with SDPA that saves only the log-sum-exp) or "full" (with
    --recompute-method/--recompute-num-layers)."""
    if not chunks:
        return 0.0
    kept, recomputed = zip(*(_chunk_layers_bytes(args, c.num_layers, recompute) for c in chunks))
    total = peak_in_flight_bytes(args, pp_rank, kept) + max(recomputed)
    if any(c.post_process for c in chunks):
        # the loss runs forward then backward at once: one micro-batch of the head at a time
        total += output_layer_bytes(args) + logits_transient_bytes(args)
    return total


def configured_recompute(args) -> Optional[str]:
    granularity = args.recompute_granularity
    if granularity is None and args.recompute_activations:
        return "selective"
    return granularity


def estimate_memory(args, params: RankParams, chunks: Sequence[ChunkShape], pp_rank: int, *,
                    distributed_optimizer: Optional[bool] = None, recompute: str = "configured") -> MemoryEstimate:
    """The rank's memory; by default with the run's own --use-distributed-optimizer and
    recompute flags, or with the ones given."""
    if distributed_optimizer is None:
        distributed_optimizer = bool(args.use_distributed_optimizer)
    if recompute == "configured":
        recompute = configured_recompute(args)
    if args.use_torch_fsdp2:
        weights, grads, optimizer = fsdp2_static_memory(args, params)
    else:
        weights, grads, optimizer = static_memory(args, params, distributed_optimizer)
    return MemoryEstimate(weights, grads, optimizer, activation_memory(args, chunks, pp_rank, recompute))


def format_bytes(value: float) -> str:
    """``3.74 GiB`` from 1 GiB up, else ``12.5 MiB``."""
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / (1 << 20):.1f} MiB"


def format_memory(estimate: MemoryEstimate) -> str:
    """``weights 3.74 GiB | grads 7.48 GiB | optimizer 22.43 GiB | activations 12.10 GiB | total ...``"""
    return (f"weights {format_bytes(estimate.weights)} | grads {format_bytes(estimate.grads)} | "
            f"optimizer {format_bytes(estimate.optimizer)} | activations {format_bytes(estimate.activations)} | "
            f"total {format_bytes(estimate.total)}")


def chunks_from_counts(layer_counts: List[int], pp_rank: int, pp: int) -> List[ChunkShape]:
    """The chunks of ``pp_rank`` given each of its chunks' layer counts (chunk c is virtual
    stage c * pp + pp_rank)."""
    last = len(layer_counts) - 1
    return [ChunkShape(n, pre_process=(pp_rank == 0 and c == 0), post_process=(pp_rank == pp - 1 and c == last))
            for c, n in enumerate(layer_counts)]
