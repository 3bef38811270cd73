"""Dtypes of the precision-aware optimizer's tensors and Megatron's rules for them.

The flags take names (``fp32``, ``bf16``, ``fp16``, ``fp8``); ``OptimizerConfig`` holds
torch dtypes, with Megatron-Core's convention that ``torch.uint8`` means fp8 (stored here as
``torch.float8_e4m3fn`` with a per-tensor scale).
"""

from __future__ import annotations

from typing import Union

import torch

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}

# field -> (flag, the dtypes Megatron allows for it)
ALLOWED = {
    "main_grads_dtype": ("--main-grads-dtype", ("fp32", "bf16")),
    "main_params_dtype": ("--main-params-dtype", ("fp32", "fp16")),
    "exp_avg_dtype": ("--exp-avg-dtype", ("fp32", "fp16", "bf16", "fp8")),
    "exp_avg_sq_dtype": ("--exp-avg-sq-dtype", ("fp32", "fp16", "bf16", "fp8")),
}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    return next(name for name, value in DTYPE_NAMES.items() if value == dtype)


def dtype_from_name(field: str, value: Union[str, torch.dtype]) -> torch.dtype:
    """The torch dtype of a config field given as a flag value or a dtype; ValueError
    naming the flag when it is not one Megatron allows there."""
    flag, allowed = ALLOWED[field]
    if isinstance(value, torch.dtype):
        value = torch.uint8 if value == torch.float8_e4m3fn else value
        name = next((n for n, d in DTYPE_NAMES.items() if d == value), str(value))
    else:
        name = value
    if name not in allowed:
        raise ValueError(f"{flag} {name} is not supported: choose one of {', '.join(allowed)}")
    return DTYPE_NAMES[name]


def check_precision_aware(config) -> None:
    """Megatron's rules: the lower-precision dtypes need the precision-aware optimizer,
    which needs Adam and the distributed optimizer; CPU offload needs the precision-aware
    optimizer (it shares its code path). ``config``: an ``OptimizerConfig`` or the parsed
    flags (dtypes as names)."""
    if config.use_precision_aware_optimizer:
        if config.optimizer != "adam":
            raise ValueError(f"--use-precision-aware-optimizer works with --optimizer adam only, "
                             f"got --optimizer {config.optimizer}")
        if not config.use_distributed_optimizer:
            raise ValueError("--use-precision-aware-optimizer needs --use-distributed-optimizer: add it")
    else:
        for field, (flag, _) in ALLOWED.items():
            dtype = dtype_from_name(field, getattr(config, field))
            if dtype != torch.float32:
                raise ValueError(f"{flag} {dtype_name(dtype)} needs "
                                 "--use-precision-aware-optimizer (without it every optimizer tensor is fp32): "
                                 "add it, or drop the flag")
    if config.optimizer_cpu_offload and not config.use_precision_aware_optimizer:
        raise ValueError("--optimizer-cpu-offload must be used with --use-precision-aware-optimizer (as in "
                         "Megatron, the offloaded step shares its code path): add it")
    if not 0.0 <= config.optimizer_offload_fraction <= 1.0:
        raise ValueError(f"--optimizer-offload-fraction must be in [0, 1], got {config.optimizer_offload_fraction}")
