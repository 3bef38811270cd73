"""Translate the parsed command line into core configs, once.

Rule (as in Megatron): every config field whose name is also an ``args`` attribute takes the
flag's value; the few flags whose config field has another name are listed in
``ARG_TO_CONFIG_FIELD``; flags that set several fields (``--swiglu``) or need a conversion are
handled explicitly below. Each builder passes only fields the config class actually has
(``dataclasses.fields``), so configs and flags can grow independently.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.activations import openai_gelu, quick_gelu, squared_relu
from megatron.core.transformer.transformer_config import TransformerConfig

# args attribute -> TransformerConfig field, where the names differ.
ARG_TO_CONFIG_FIELD: Dict[str, str] = {
    "norm_epsilon": "layernorm_epsilon",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
    "num_experts": "num_moe_experts",
    "fp8_param_gather": "fp8_param",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
    "microbatch_group_size_per_virtual_pipeline_stage": "microbatch_group_size_per_vp_stage",
}


def _init_fields(config_class) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class) if f.init}


def build_config(config_class, args: argparse.Namespace, overrides: Optional[Dict[str, Any]] = None):
    """Instantiate ``config_class`` from same-named ``args`` attributes plus ``overrides``.

    An ``args`` value of None is skipped when the field's own default is not None (so a flag
    that Megatron leaves as None, such as --use-cpu-initialization, keeps the config default).
    Override keys that are not fields of ``config_class`` are dropped.
    """
    fields = _init_fields(config_class)
    kwargs: Dict[str, Any] = {}
    for name, field in fields.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is None and field.default is not None and field.default is not dataclasses.MISSING:
            continue
        kwargs[name] = value
    for name, value in (overrides or {}).items():
        if name in fields:
            kwargs[name] = value
    return config_class(**kwargs)


def _activation_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    if args.swiglu:
        return {"gated_linear_unit": True, "activation_func": F.silu,
                "bias_activation_fusion": args.bias_swiglu_fusion}
    out: Dict[str, Any] = {"bias_activation_fusion": args.bias_gelu_fusion}
    if args.squared_relu:
        out["activation_func"] = squared_relu
    elif args.openai_gelu:
        out["activation_func"] = openai_gelu
    elif args.quick_geglu:
        out.update(gated_linear_unit=True, activation_func=quick_gelu)
    return out


def transformer_config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Config values that do not come from a same-named flag."""
    out: Dict[str, Any] = {
        name: getattr(args, arg) for arg, name in ARG_TO_CONFIG_FIELD.items() if hasattr(args, arg)
    }
    out["persist_layer_norm"] = not args.no_persist_layer_norm
    out.update(_activation_overrides(args))
    if not args.group_query_attention:
        out["num_query_groups"] = None
    if args.window_size is not None:
        out["window_size"] = tuple(args.window_size)
    if args.init_method_xavier_uniform:
        out["init_method"] = torch.nn.init.xavier_uniform_
        out["output_layer_init_method"] = torch.nn.init.xavier_uniform_
    params_dtype = getattr(args, "params_dtype", None)
    if params_dtype is not None:
        out["pipeline_dtype"] = params_dtype
    if hasattr(args, "overlap_p2p_comm"):
        out["batch_p2p_comm"] = not args.overlap_p2p_comm
    out["deallocate_pipeline_outputs"] = True
    return out


def core_transformer_config_from_args(args: argparse.Namespace, config_class=None):
    """Build a ``TransformerConfig`` (or ``config_class``) from validated ``args``.

    Call after ``validate_args`` so derived values (kv_channels, ffn_hidden_size, params_dtype,
    virtual_pipeline_model_parallel_size, recompute_granularity from --recompute-activations,
    ...) are present: each is derived once, in ``derived_args``.
    """
    config_class = config_class or TransformerConfig
    overrides = transformer_config_overrides(args)
    softmax_field = _init_fields(config_class).get("attention_softmax_in_fp32")
    if softmax_field is not None and not args.attention_softmax_in_fp32:
        # Megatron's flag only turns fp32 softmax on; its fused/TE kernels keep fp32 internally
        # without it. The plain-PyTorch path would honour False literally, so keep the default.
        overrides["attention_softmax_in_fp32"] = softmax_field.default
    return build_config(config_class, args, overrides)


def get_megatron_optimizer_config(args: argparse.Namespace):
    """``megatron.core.optimizer.OptimizerConfig`` from ``args`` (all field names equal flag names)."""
    from megatron.core.optimizer import OptimizerConfig

    return build_config(OptimizerConfig, args)


def get_ddp_config(args: argparse.Namespace, num_parameters: Optional[int] = None):
    """``megatron.core.distributed.DistributedDataParallelConfig`` from ``args``.

    ``num_parameters`` (this rank's) turns --ddp-num-buckets N into buckets of
    ceil(num_parameters / N) elements."""
    from megatron.core.distributed import DistributedDataParallelConfig

    bucket_size = args.ddp_bucket_size
    num_buckets = args.ddp_num_buckets
    if num_buckets is not None and num_parameters is not None:
        bucket_size = max(1, -(-num_parameters // num_buckets))
    overrides = {
        # --grad-reduce-in-bf16 keeps bf16 grad buffers even where fp32 accumulation was asked for.
        "grad_reduce_in_fp32": (args.accumulate_allreduce_grads_in_fp32
                                and not args.grad_reduce_in_bf16),
        "bucket_size": bucket_size,
        "average_in_collective": args.ddp_average_in_collective,
        # The training loop checks losses and gradients on every rank together
        # (megatron/training/nan_check.py); a per-bucket check that raises on one rank
        # would leave the others waiting in the reduction.
        "check_for_nan_in_grad": False,
        "pad_buckets_for_high_nccl_busbw": args.ddp_pad_buckets_for_high_nccl_busbw,
    }
    return build_config(DistributedDataParallelConfig, args, overrides)
