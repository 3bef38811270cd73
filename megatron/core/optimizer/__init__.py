"""Optimizers: param groups, the torch optimizer and its Megatron mixed-precision wrapper.

    optimizer = get_megatron_optimizer(OptimizerConfig(lr=3e-4, bf16=True), model_chunks)

Param groups follow Megatron: no weight decay on biases and 1-D params (norms) unless
``no_weight_decay_cond`` says otherwise (--apply-wd-to-qk-layernorm keeps it on the q/k
layernorm params); ``scale_lr_cond`` params get ``lr_mult``; params
marked ``is_embedding_or_output_parameter`` get --decoupled-lr when it is set. Groups
carry ``wd_mult``/``lr_mult`` (and ``max_lr``/``min_lr`` for the decoupled group),
which ``OptimizerParamScheduler`` applies.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch.distributed.tensor import DTensor

from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    get_grad_norm_fp32,
    grads_are_finite,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.fully_sharded_optimizer import FullyShardedOptimizer
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from megatron.core.optimizer.lion import Lion
from megatron.core.optimizer.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
)
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.optimizer.precision_aware_adam import PrecisionAwareAdamW
from megatron.core.process_groups import ProcessGroups

__all__ = [
    "ConstantGradScaler",
    "DistributedOptimizer",
    "DynamicGradScaler",
    "Float16OptimizerWithFloat16Params",
    "FP32Optimizer",
    "FullyShardedOptimizer",
    "Lion",
    "MegatronGradScaler",
    "MegatronOptimizer",
    "OptimizerConfig",
    "PrecisionAwareAdamW",
    "clip_grad_by_total_norm_fp32",
    "count_zeros_fp32",
    "get_grad_norm_fp32",
    "get_megatron_optimizer",
    "get_param_groups",
    "grads_are_finite",
]


def _default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith(".bias") or len(param.shape) == 1


def _is_qk_layernorm(name: str) -> bool:
    return "q_layernorm." in name or "k_layernorm." in name


def _no_weight_decay_except_qk_layernorm(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's rule under --apply-wd-to-qk-layernorm: the default rule, except that every
    param of a q/k layernorm (by name) is decayed."""
    return _default_no_weight_decay(name, param) and not _is_qk_layernorm(name)


def get_param_groups(
    model_chunks: List[torch.nn.Module],
    config: OptimizerConfig,
    no_weight_decay_cond: Optional[Callable] = None,
    scale_lr_cond: Optional[Callable] = None,
    lr_mult: float = 1.0,
) -> List[dict]:
    """Trainable params grouped by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr).

    Groups are sorted by that key so that every rank builds them in the same order.
    """
    buckets: Dict[Tuple[float, float, bool, bool], List[torch.nn.Parameter]] = {}
    seen = set()
    default_no_wd = (_no_weight_decay_except_qk_layernorm if config.apply_wd_to_qk_layernorm
                     else _default_no_weight_decay)
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            no_wd = (no_weight_decay_cond or default_no_wd)(name, param)
            scale_lr = scale_lr_cond(name, param) if scale_lr_cond is not None else False
            key = (
                0.0 if no_wd else 1.0,
                lr_mult if scale_lr else 1.0,
                not getattr(param, "allreduce", True),
                config.decoupled_lr is not None and getattr(param, "is_embedding_or_output_parameter", False),
            )
            buckets.setdefault(key, []).append(param)
    groups = []
    for key in sorted(buckets):
        wd_mult, group_lr_mult, is_expert, is_decoupled = key
        group = {
            "params": buckets[key],
            "wd_mult": wd_mult,
            "lr_mult": group_lr_mult,
            "is_expert_parallel": is_expert,
            "is_decoupled_lr": is_decoupled,
            "weight_decay": config.weight_decay * wd_mult,
            "lr": config.lr * group_lr_mult,
        }
        if is_decoupled:
            group["max_lr"] = config.decoupled_lr
            group["min_lr"] = config.decoupled_min_lr if config.decoupled_min_lr is not None else config.min_lr
            group["lr"] = config.decoupled_lr * group_lr_mult
        groups.append(group)
    return groups


def _torch_optimizer(config: OptimizerConfig, param_groups: List[dict]) -> torch.optim.Optimizer:
    params = [p for g in param_groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if config.use_precision_aware_optimizer:
        return PrecisionAwareAdamW(
            param_groups,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            master_params_dtype=config.main_params_dtype,
            exp_avg_dtype=config.exp_avg_dtype,
            exp_avg_sq_dtype=config.exp_avg_sq_dtype,
            pin_cpu_grads=config.pin_cpu_grads,
            pin_cpu_params=config.pin_cpu_params,
            overlap_d2h_h2d=config.overlap_cpu_optimizer_d2h_h2d,
        )
    if config.optimizer == "adam":
        # fused AdamW is the fastest pure-PyTorch path on GPU; CPU keeps the default.
        extra = {"fused": True} if on_cuda else {}
        return torch.optim.AdamW(
            param_groups,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            **extra,
        )
    if config.optimizer == "lion":
        return Lion(param_groups, lr=config.lr, betas=(config.lion_beta1, config.lion_beta2),
                    weight_decay=config.weight_decay)
    return torch.optim.SGD(param_groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.sgd_momentum)


def _grad_scaler(config: OptimizerConfig, device: torch.device) -> Optional[MegatronGradScaler]:
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale, device=device)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=int(config.loss_scale_window),
            hysteresis=config.hysteresis,
            device=device,
        )
    return None


def _fully_sharded_optimizer(config: OptimizerConfig, optimizer, pg_collection) -> MegatronOptimizer:
    """FSDP2 params are the fp32 main params, already sharded: no second sharding, no loss scaler."""
    if config.use_distributed_optimizer:
        raise ValueError("--use-distributed-optimizer with --use-torch-fsdp2: FSDP2 already shards the optimizer "
                         "state over data-parallel ranks; drop --use-distributed-optimizer")
    if config.fp16 or config.loss_scale:
        raise ValueError("--fp16 / --loss-scale with --use-torch-fsdp2: FSDP2 has no loss scaler here (nor in "
                         "Megatron-LM); train in --bf16 or drop --use-torch-fsdp2")
    return FullyShardedOptimizer(optimizer, config, pg_collection=pg_collection)


def get_megatron_optimizer(
    config: OptimizerConfig,
    model_chunks: Union[torch.nn.Module, List[torch.nn.Module]],
    no_weight_decay_cond: Optional[Callable] = None,
    scale_lr_cond: Optional[Callable] = None,
    lr_mult: float = 1.0,
    pg_collection: Optional[ProcessGroups] = None,
) -> MegatronOptimizer:
    """Build the optimizer for this rank's model chunks (DDP-wrapped or not).

    --use-distributed-optimizer -> ``DistributedOptimizer`` (the chunks must be DDP-wrapped
    with the distributed optimizer; any param dtype), stepping ``PrecisionAwareAdamW`` with
    --use-precision-aware-optimizer (docs/optimizer_memory.md); fp16/bf16 ->
    ``Float16OptimizerWithFloat16Params`` (fp32 main params; a loss scaler with --fp16
    or --loss-scale); otherwise ``FP32Optimizer``. Chunks wrapped by FSDP2 (DTensor
    params) get ``FullyShardedOptimizer``.
    """
    if config.lr is None:
        raise ValueError("--lr is required to build the optimizer: pass the peak learning rate, e.g. --lr 3e-4")
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    param_groups = get_param_groups(chunks, config, no_weight_decay_cond, scale_lr_cond, lr_mult)
    if not param_groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer = _torch_optimizer(config, param_groups)
    device = param_groups[0]["params"][0].device
    if any(isinstance(p, DTensor) for g in param_groups for p in g["params"]):
        return _fully_sharded_optimizer(config, optimizer, pg_collection)
    if config.use_distributed_optimizer:
        scaler = _grad_scaler(config, device) if (config.fp16 or config.bf16) else None
        return DistributedOptimizer(optimizer, config, scaler, None, chunks, pg_collection=pg_collection)
    if config.fp16 or config.bf16:
        return Float16OptimizerWithFloat16Params(
            optimizer, config, _grad_scaler(config, device), pg_collection=pg_collection
        )
    return FP32Optimizer(optimizer, config, pg_collection=pg_collection)
