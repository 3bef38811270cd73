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

from dataclasses import dataclass
from typing import List, Optional, Sequence

GiB = float(1 << 30)


@dataclass(frozen=True)
class ChunkShape:
    """One model chunk of a rank: its layers, and whether it holds the embedding (first
    virtual stage) and the output layer with the loss (last virtual stage). A hybrid
    (Mamba) chunk names its layers by their pattern symbols in ``hybrid_pattern``
    (``M`` Mamba, ``*`` attention, ``-`` MLP, ``E`` MoE); otherwise every layer is a
    transformer layer."""

    num_layers: int
    pre_process: bool
    post_process: bool
    hybrid_pattern: str = ""

    def layer_kinds(self) -> str:
        return self.hybrid_pattern or "T" * self.num_layers


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
    optimizer state of dense params over DP x CP and of expert params over expert DP, each
    divided by --num-distributed-optimizer-instances (every instance holds a full copy)."""
    weights = params.total * param_bytes(args)
    grads = params.total * grad_bytes(args)
    per_param = optimizer_bytes_per_param(args)
    if distributed_optimizer:
        instances = args.num_distributed_optimizer_instances
        dense_shards = args.data_parallel_size * args.context_parallel_size // instances
        expert_shards = expert_data_parallel_size(args) // instances
        optimizer = per_param * (params.dense / dense_shards + params.expert / expert_shards)
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


def _norm_bytes(args) -> float:
    """Per token, one pre-norm: its input and output (the next linear's input), and its
    fp32 1/rms (the fused CUDA norms keep no fp32 copy of the input)."""
    return activation_bytes(args) * 2 * args.hidden_size / _sp(args) + 4 / _sp(args)


def _attention_bytes(args, selective: bool) -> float:
    """Per token, self-attention: the QKV output (n d + 2 g d)/tp (q, k, v are views of it),
    with rotary embeddings the rotated q and k, (n d + g d)/tp, the attention output (the
    projection's input, n d/tp), and attention's fp32 log-sum-exp (n/tp), which selective
    recompute does not keep (its checkpoint's inputs and output are kept anyway)."""
    tp = args.tensor_model_parallel_size
    n, d = args.num_attention_heads, args.kv_channels
    g = args.num_query_groups if args.group_query_attention else n
    elements = (n * d + 2 * g * d + n * d) / tp
    if args.position_embedding_type in ("rope", "yarn", "mrope"):
        # the rotated q and k are new tensors; v stays a view that keeps the QKV output alive
        elements += (n * d + g * d) / tp
    return activation_bytes(args) * elements + (0.0 if selective else 4 * n / tp)


def _mlp_bytes(args) -> float:
    """Per token, the MLP: FC1's output (f/tp, 2f/tp gated) and the activation's output
    (FC2's input, f/tp; gated adds the silu output, f/tp). MoE layers are counted as one
    dense MLP of --ffn-hidden-size."""
    f = args.ffn_hidden_size
    return activation_bytes(args) * (4 * f if args.swiglu else 2 * f) / args.tensor_model_parallel_size


def _mamba_bytes(args) -> float:
    """Per token, the Mamba-2 mixer (inner width di, G groups of state N, H heads, over tp):
    the in-projection's output z|xBC|dt (2 di + 2 G N + H), the conv's contiguous input and
    its output (di + 2 G N each; x, B and C are views of the output), the SSD output y and
    the gated norm's output (the out-projection's input), di each; in fp32 the softplus
    input and output of dt (2 H) and the gated norm's 1/rms per group (G). The SSD kernels
    recompute their chunk states in backward; the compiled gated norm keeps only y and z."""
    from megatron.core.ssm.mamba_config import MambaConfig

    cfg = MambaConfig(mamba_state_dim=args.mamba_state_dim, mamba_head_dim=args.mamba_head_dim,
                      mamba_num_groups=args.mamba_num_groups, mamba_num_heads=args.mamba_num_heads)
    di, heads = cfg.inner_size(args.hidden_size), cfg.num_heads(args.hidden_size)
    bc = 2 * args.mamba_num_groups * args.mamba_state_dim
    elements = (2 * di + bc + heads) + 2 * (di + bc) + 2 * di
    fp32 = 2 * heads + args.mamba_num_groups
    return (activation_bytes(args) * elements + 4 * fp32) / args.tensor_model_parallel_size


def _dropout_bytes(args) -> float:
    """Per token, the bool mask of one hidden dropout (none at --hidden-dropout 0)."""
    return args.hidden_size / _sp(args) if args.hidden_dropout > 0 else 0.0


def layer_activation_bytes(args, selective: bool = False, kind: str = "T") -> float:
    """Bytes one layer keeps for backward per micro-batch, without recompute or with
    ``selective`` (core attention) recompute. ``kind``: ``T`` a transformer layer (two
    norms, attention, MLP, two dropout-adds), or a hybrid layer symbol: ``M`` a Mamba layer,
    ``*`` an attention layer, ``-``/``E`` an MLP/MoE layer (one norm, the block, one
    dropout-add each)."""
    blocks = {
        "T": (2, lambda: _attention_bytes(args, selective) + _mlp_bytes(args)),
        "M": (1, lambda: _mamba_bytes(args)),
        "*": (1, lambda: _attention_bytes(args, selective)),
        "-": (1, lambda: _mlp_bytes(args)),
        "E": (1, lambda: _mlp_bytes(args)),
    }
    if kind not in blocks:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {''.join(blocks)}")
    residual_adds, block = blocks[kind]
    per_token = residual_adds * (_norm_bytes(args) + _dropout_bytes(args)) + block()
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


def _chunk_layers_bytes(args, chunk: ChunkShape, recompute: Optional[str]) -> tuple:
    """(bytes kept per micro-batch, bytes of the one recomputed group alive during backward)."""
    per_layer = [layer_activation_bytes(args, selective=recompute == "selective", kind=kind)
                 for kind in chunk.layer_kinds()]
    if recompute != "full" or not per_layer:
        return float(sum(per_layer)), 0.0
    group = max(1, args.recompute_num_layers or 1)
    if args.recompute_method == "block" and not chunk.hybrid_pattern:
        # the first ``group`` layers are checkpointed one by one, the rest keep everything
        recomputed = min(group, len(per_layer))
        return recomputed * layer_input_bytes(args) + sum(per_layer[recomputed:]), max(per_layer[:recomputed])
    groups = [per_layer[i:i + group] for i in range(0, len(per_layer), group)]
    return len(groups) * layer_input_bytes(args), max(sum(g) for g in groups)


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
    kept, recomputed = zip(*(_chunk_layers_bytes(args, c, recompute) for c in chunks))
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
