"""Values computed from the command line after it has been checked.

``derive_args`` only ADDS attributes that Megatron's scripts read (world_size, rank,
data_parallel_size, params_dtype, consumed_train_samples, ...) or fills values the user left
as None (kv_channels, ffn_hidden_size, global_batch_size, split, ...). The exceptions are the
ones Megatron itself makes, each logged: --sequence-parallel is turned off when TP = 1,
``overlap_p2p_comm``/``align_param_gather`` are turned off without the interleaved pipeline,
``check_for_nan_in_loss_and_grad`` is turned off under fp16 dynamic loss scaling (NaNs are
the scaler's signal there), ``accumulate_allreduce_grads_in_fp32`` is turned on for bf16.
Three follow the model without a log line, as in Megatron, because they only switch off a
fusion that has nothing to fuse (or switch on what the user's other flag implies):
``add_qkv_bias`` follows ``add_bias_linear``, ``bias_gelu_fusion`` is off without linear
biases (the fused kernel is a bias-GeLU; exported checkpoints read it to name the GeLU),
``apply_rope_fusion`` is off without rotary embeddings.

The run's counters (consumed samples, iteration, ...) are not derived values: they belong
to the training loop's ``RunState``, which publishes their starting zeros here.

--eval-interval None (Megatron HEAD's default) is kept as None and means "no periodic
evaluation". --transformer-impl is kept as given: the model builder uses the local modules when
Transformer Engine is absent. --distributed-backend is kept as given: initialization falls back
to gloo when CUDA is absent.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Optional

import torch

from megatron.core.transformer.transformer_config import default_ffn_hidden_size
from megatron.training.argument_checks import virtual_pipeline_size
from megatron.training.batch_size_schedule import scheduled_global_batch_size
from megatron.training.run_state import RunState

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "969, 30, 1"


def apply_defaults(args: argparse.Namespace, defaults: Optional[Dict[str, Any]]) -> None:
    """Megatron's ``args_defaults``: set each key the user left as None (never overrides)."""
    for key, value in (defaults or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
        elif getattr(args, "rank", 0) == 0:
            logger.warning("--%s is %r, so the script's default %r is not used",
                           key.replace("_", "-"), getattr(args, key), value)


def derive_args(args: argparse.Namespace, world_size: int, rank: int) -> argparse.Namespace:
    """Add the derived attributes described in the module docstring; returns ``args``."""
    _derive_layout(args, world_size, rank)
    _derive_model_shape(args)
    _derive_pipeline(args)
    _derive_batch_and_data(args)
    _derive_precision(args)
    _derive_training_state(args)
    return args


def _warn(args: argparse.Namespace, message: str, *fmt) -> None:
    if args.rank == 0:
        logger.warning(message, *fmt)


def _derive_layout(args: argparse.Namespace, world_size: int, rank: int) -> None:
    args.world_size = world_size
    args.rank = rank
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    args.data_parallel_size = world_size // (tp * pp * cp)
    args.transformer_pipeline_model_parallel_size = pp
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp
    if tp == 1 and args.sequence_parallel:
        _warn(args, "Disabling --sequence-parallel because --tensor-model-parallel-size is 1")
        args.sequence_parallel = False
    args.use_dist_ckpt = args.ckpt_format != "torch"
    if rank == 0:
        logger.info("world size %d: data-parallel %d, context-parallel %d, tensor-parallel %d, pipeline-parallel %d",
                    world_size, args.data_parallel_size, cp, tp, pp)


def _derive_model_shape(args: argparse.Namespace) -> None:
    if args.num_layers is None:
        args.num_layers = args.encoder_num_layers
    args.encoder_num_layers = args.num_layers
    if args.seq_length is None:
        args.seq_length = args.encoder_seq_length
    args.encoder_seq_length = args.seq_length
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, swiglu=args.swiglu)
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.position_embedding_type != "rope":
        args.apply_rope_fusion = False
    if args.add_bias_linear:
        args.add_qkv_bias = True
    else:
        args.bias_gelu_fusion = False
    if args.num_experts == 0:
        args.num_experts = None
    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.recompute_activations and args.recompute_granularity is None:
        args.recompute_granularity = "selective"


def _derive_pipeline(args: argparse.Namespace) -> None:
    args.virtual_pipeline_model_parallel_size = virtual_pipeline_size(args)
    if args.virtual_pipeline_model_parallel_size is None:
        if args.pipeline_model_parallel_size > 1 and (args.overlap_p2p_comm or args.align_param_gather):
            _warn(args, "Turning off p2p overlap and aligned param gather: they need the interleaved pipeline")
        args.overlap_p2p_comm = False
        args.align_param_gather = False
    if args.microbatch_group_size_per_virtual_pipeline_stage is None:
        args.microbatch_group_size_per_virtual_pipeline_stage = args.pipeline_model_parallel_size


def _derive_batch_and_data(args: argparse.Namespace) -> None:
    if args.global_batch_size is None:
        args.global_batch_size = scheduled_global_batch_size(args)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
        if args.rank == 0:
            logger.info("setting global batch size to %d", args.global_batch_size)
    if args.data_path is not None and args.split is None:
        _warn(args, "--split not given with --data-path; using Megatron's default %r", DEFAULT_SPLIT)
        args.split = DEFAULT_SPLIT
    if args.dataloader_type is None:
        args.dataloader_type = "single"
    if args.weight_decay_incr_style == "constant":
        args.start_weight_decay = args.weight_decay
        args.end_weight_decay = args.weight_decay


def _derive_precision(args: argparse.Namespace) -> None:
    if args.cross_entropy_loss_fusion is None:
        # The chunked cross entropy never holds fp32 logits of the whole micro-batch: on a GPU
        # it is faster (fewer passes over the logits) and smaller; the CPU keeps the reference.
        args.cross_entropy_loss_fusion = torch.cuda.is_available() and not args.deterministic_mode
    args.params_dtype = torch.float32
    if args.fp16:
        args.params_dtype = torch.float16
        if not args.loss_scale and args.check_for_nan_in_loss_and_grad:
            _warn(args, "Turning off the NaN check: dynamic loss scaling uses NaN/Inf gradients as its signal")
            args.check_for_nan_in_loss_and_grad = False
    if args.bf16:
        args.params_dtype = torch.bfloat16
        if args.main_grads_dtype == "bf16" and args.accumulate_allreduce_grads_in_fp32:
            raise ValueError("--main-grads-dtype bf16 contradicts --accumulate-allreduce-grads-in-fp32: drop one")
        if args.grad_reduce_in_bf16 or args.main_grads_dtype == "bf16":
            # As Megatron: the DDP grad buffers stay bf16 (accumulated and reduced in bf16) and
            # the optimizer upcasts its shard to the fp32 main grads before the step (or, with
            # --main-grads-dtype bf16, the precision-aware step reads the bf16 shard).
            args.accumulate_allreduce_grads_in_fp32 = False
            if args.rank == 0:
                logger.info("accumulating and all-reducing gradients in bf16 (%s)", "--grad-reduce-in-bf16"
                            if args.grad_reduce_in_bf16 else "--main-grads-dtype bf16")
        elif not args.accumulate_allreduce_grads_in_fp32:
            args.accumulate_allreduce_grads_in_fp32 = True
            if args.rank == 0:
                logger.info("accumulating and all-reducing gradients in fp32 for bfloat16")
    elif args.grad_reduce_in_bf16:
        _warn(args, "--grad-reduce-in-bf16 does nothing without --bf16: gradients have the params' dtype")
    if not args.bf16 and args.main_grads_dtype == "bf16":
        _warn(args, "--main-grads-dtype bf16 does nothing without --bf16: gradients have the params' dtype")


def _derive_training_state(args: argparse.Namespace) -> None:
    # The run's counters are the training loop's RunState; scripts that read them from
    # ``args`` before training starts find zeros, as in Megatron.
    RunState().publish(args)
    args.variable_seq_lengths = False
