"""``OptimizerConfig``: the optimizer, its hyper-parameters and mixed-precision settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.optimizer.optimizer_dtypes import check_precision_aware, dtype_from_name


@dataclass
class OptimizerConfig:
    """Field names follow Megatron-Core; each docstring is the matching flag's help."""

    optimizer: str = "adam"
    """Optimizer: 'adam' (decoupled weight decay, AdamW), 'sgd' or 'lion' (sign of the
    interpolated momentum, decoupled weight decay) (--optimizer)."""

    lr: Optional[float] = None
    """Initial (peak) learning rate (--lr)."""

    min_lr: Optional[float] = None
    """Minimum learning rate of the decay schedule (--min-lr)."""

    decoupled_lr: Optional[float] = None
    """Separate learning rate for the input and output layers (--decoupled-lr)."""

    decoupled_min_lr: Optional[float] = None
    """Minimum of the decoupled learning rate (--decoupled-min-lr)."""

    weight_decay: float = 0.01
    """Weight-decay coefficient for L2 regularization (--weight-decay)."""

    apply_wd_to_qk_layernorm: bool = False
    """Apply weight decay to the q/k layernorm params too (Qwen3-Next); biases and other
    1-D params still get none (--apply-wd-to-qk-layernorm)."""

    fp16: bool = False
    """Model params are float16; keep fp32 main params and scale the loss (--fp16)."""

    bf16: bool = False
    """Model params are bfloat16; keep fp32 main params (--bf16)."""

    params_dtype: torch.dtype = torch.float32
    """Dtype of the model's params."""

    loss_scale: Optional[float] = None
    """Static loss scale (a positive power of 2 helps convergence); None: dynamic
    scaling with --fp16 (--loss-scale)."""

    initial_loss_scale: float = 2**32
    """Initial dynamic loss scale (--initial-loss-scale)."""

    min_loss_scale: float = 1.0
    """Minimum dynamic loss scale (--min-loss-scale)."""

    loss_scale_window: float = 1000
    """Steps without overflow before the dynamic scale is doubled (--loss-scale-window)."""

    hysteresis: int = 2
    """Overflowing steps tolerated before the dynamic scale is halved (--hysteresis)."""

    adam_beta1: float = 0.9
    """First coefficient for the running averages of grad and its square (--adam-beta1)."""

    adam_beta2: float = 0.999
    """Second coefficient for the running averages of grad and its square (--adam-beta2)."""

    adam_eps: float = 1e-08
    """Term added to the denominator for numerical stability (--adam-eps)."""

    sgd_momentum: float = 0.9
    """Momentum factor for SGD (--sgd-momentum)."""

    lion_beta1: float = 0.95
    """Lion: weight of the momentum in the interpolation whose sign is the update (--lion-beta1)."""

    lion_beta2: float = 0.98
    """Lion: decay rate of the momentum (--lion-beta2)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (--use-distributed-optimizer)."""

    use_precision_aware_optimizer: bool = False
    """Store the optimizer's main params, main grads and Adam moments in the dtypes below
    (needs --use-distributed-optimizer and --optimizer adam) (--use-precision-aware-optimizer)."""

    main_grads_dtype: Union[str, torch.dtype] = torch.float32
    """Dtype of the main grads the optimizer reads: fp32, or bf16 (grads are then accumulated
    and reduced in bf16) (--main-grads-dtype)."""

    main_params_dtype: Union[str, torch.dtype] = torch.float32
    """Dtype of the main (master) params: fp32, or fp16 with a per-tensor scale
    (--main-params-dtype)."""

    exp_avg_dtype: Union[str, torch.dtype] = torch.float32
    """Dtype of Adam's first moment: fp32, bf16, or fp16/fp8 with a per-tensor scale (--exp-avg-dtype)."""

    exp_avg_sq_dtype: Union[str, torch.dtype] = torch.float32
    """Dtype of Adam's second moment: fp32, bf16, or fp16/fp8 with a per-tensor scale
    (--exp-avg-sq-dtype)."""

    optimizer_cpu_offload: bool = False
    """Keep the main params and optimizer state of a fraction of the params on the CPU and
    step them there (needs --use-precision-aware-optimizer) (--optimizer-cpu-offload)."""

    optimizer_offload_fraction: float = 1.0
    """Fraction of the params (by element count) whose optimizer step is offloaded
    (--optimizer-offload-fraction)."""

    overlap_cpu_optimizer_d2h_h2d: bool = False
    """Copy grads to the CPU and params back on side CUDA streams, overlapping the CPU step
    (--overlap-cpu-optimizer-d2h-h2d)."""

    pin_cpu_grads: bool = True
    """Pin the CPU copies of offloaded grads (--no-pin-cpu-grads turns it off)."""

    pin_cpu_params: bool = True
    """Pin the CPU main params of offloaded params (--no-pin-cpu-params turns it off)."""

    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping (--clip-grad)."""

    log_num_zeros_in_grad: bool = False
    """Count the zero entries of the gradients each step (--log-num-zeros-in-grad)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd", "lion"):
            raise ValueError(f"--optimizer {self.optimizer!r} is not supported: choose 'adam', 'sgd' or 'lion'")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 cannot both be set: choose one precision")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}: the rule is min_lr <= lr")
        if self.clip_grad < 0.0:
            raise ValueError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ValueError(f"--loss-scale must be positive, got {self.loss_scale}")
        for name in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
            setattr(self, name, dtype_from_name(name, getattr(self, name)))
        check_precision_aware(self)
