"""Megatron optimizers: a wrapper around a ``torch.optim`` optimizer that adds
main-grad handling, mixed precision, loss scaling, grad clipping and grad statistics.

``step()`` returns ``(update_successful, grad_norm, num_zeros_in_grad)``:
- ``update_successful`` is False when the step was skipped: an fp16 overflow (the loss
  scaler backs off), or a NaN/Inf global grad norm (bf16/fp32; Megatron would apply
  it and corrupt the weights);
- ``grad_norm`` is the global L2 norm before clipping (None when --clip-grad is 0 or
  on an fp16 overflow);
- ``num_zeros_in_grad`` is set with --log-num-zeros-in-grad.

``step_on_device()`` takes the same step without reading anything back to the host: the
grad norm, the clipping and the skip on a NaN/Inf norm stay on the GPU (the torch
optimizer's ``found_inf``), and the triple comes back as a ``DeviceStepResult`` to be read
later. Only where ``can_step_on_device`` (a fused torch optimizer, no fp16 loss scaler).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import process_groups
from megatron.core.fp8.weight_cache import weights_updated
from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    clip_grad_by_total_norm_tensor,
    count_zeros_fp32,
    count_zeros_tensor,
    combined_grad_norm_tensor,
    get_grads_for_norm,
    unscale_and_check_for_nan,
)
from megatron.core.optimizer.device_step import DeviceStepResult
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer_config import OptimizerConfig
from megatron.core.process_groups import ProcessGroups
from megatron.core.tensor_parallel.partition import PARAM_SPLIT_ATTRIBUTES

logger = logging.getLogger(__name__)

# The fp32 main copy carries them so that grad statistics count it as the model param.
_COPIED_PARAM_ATTRIBUTES = PARAM_SPLIT_ATTRIBUTES

StepResult = Tuple[bool, Optional[float], Optional[int]]


def _zero_grad_group(params: List[torch.Tensor], set_to_none: bool) -> None:
    for param in params:
        if param.grad is None:
            continue
        if set_to_none:
            param.grad = None
        else:
            param.grad.detach_()
            param.grad.requires_grad_(False)
            param.grad.zero_()


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class MegatronOptimizer(ABC):
    """Base: holds the torch optimizer, the config and the groups for grad statistics
    (model-parallel group for sums, tensor-parallel group to skip replicated params)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        init_state_fn: Optional[Callable] = None,
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        self.optimizer = optimizer
        self.config = config
        self.init_state_fn = init_state_fn or (lambda opt, cfg=None: None)
        pgs = process_groups.resolve(pg_collection)
        self.tp_group = pgs.tp
        self.grad_stats_parallel_group = pgs.mp
        # Expert params (allreduce=False) differ over expert-parallel ranks and are
        # replicated over expert-data-parallel ones: their statistics sum over the expert
        # tp x ep x pp group, with expert-tp duplicates counted on expert-tp rank 0.
        self.expert_tp_group = pgs.expt_tp
        self.expert_grad_stats_parallel_group = pgs.tp_ep_pp

    def get_parameters(self) -> List[torch.Tensor]:
        """The params the torch optimizer updates (fp32 main params when mixed precision)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def get_main_grads_for_grad_norm(self) -> List[torch.Tensor]:
        """Dense grads counted in the global norm on this rank (no shared, no tp duplicate)."""
        dense = [p for p in self.get_parameters() if getattr(p, "allreduce", True)]
        return get_grads_for_norm(dense, self.tp_group)

    def get_expert_grads_for_grad_norm(self) -> List[torch.Tensor]:
        """Expert grads counted in the global norm on this rank (no expert-tp duplicate)."""
        experts = [p for p in self.get_parameters() if not getattr(p, "allreduce", True)]
        return get_grads_for_norm(experts, self.expert_tp_group)

    def get_grad_stats_parallel_group(self):
        return self.grad_stats_parallel_group

    def clip_grad_norm(self, clip_grad: float) -> float:
        """Global grad norm (before clipping); grads are scaled to ``clip_grad`` if larger."""
        grad_norm = self.grad_norm_tensor().item()
        clip_grad_by_total_norm_fp32(self.get_parameters(), clip_grad, grad_norm)
        return grad_norm

    def count_zeros(self) -> int:
        return int(count_zeros_fp32(self.get_parameters(), self.grad_stats_parallel_group, self.tp_group))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale (1 without fp16 scaling)."""
        return self.get_loss_scale() * loss

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    def _clip_and_step(self) -> StepResult:
        """Clip, count zeros, and step unless the grad norm is NaN/Inf."""
        grad_norm = self.clip_grad_norm(self.config.clip_grad) if self.config.clip_grad > 0.0 else None
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            logger.warning("rank %d: grad norm is %s; skipping the optimizer step", _global_rank(), grad_norm)
            return False, grad_norm, num_zeros
        self.optimizer.step()
        weights_updated()  # cached FP8 copies of the weights are stale from here
        return True, grad_norm, num_zeros

    @property
    def can_step_on_device(self) -> bool:
        """Whether ``step_on_device`` works: the torch optimizer skips a step on a device flag
        (fused AdamW/Adam/SGD take ``found_inf``) and no fp16 loss scaler needs the host."""
        fused = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        return fused and getattr(self.optimizer, "_step_supports_amp_scaling", False) and self._grad_scaler() is None

    def _grad_scaler(self) -> Optional[MegatronGradScaler]:
        return getattr(self, "grad_scaler", None)

    def loss_scale_for_log(self) -> float:
        """The loss scale as the log line prints it; 1.0 without a scaler, read with no host sync."""
        scaler = self._grad_scaler()
        return 1.0 if scaler is None else float(scaler.scale)

    @torch.no_grad()
    def step(self) -> StepResult:
        """One update; see the module docstring for the returned triple."""
        self._before_step()
        if self.prepare_grads():
            return False, None, None
        result = self._clip_and_step()
        if result[0]:
            self._after_update()
        return result

    @torch.no_grad()
    def step_on_device(self) -> DeviceStepResult:
        """``step()`` with no host sync: the clipping and the skip on a non-finite grad norm
        happen on the device; the result is read later (``DeviceStepResult``)."""
        if not self.can_step_on_device:
            raise RuntimeError(f"{type(self).__name__} over {type(self.optimizer).__name__} cannot step on the device")
        self._before_step()
        self.prepare_grads()  # no loss scaler: nothing found, nothing read
        grad_norm = found_inf = num_zeros = None
        if self.config.clip_grad > 0.0:
            grad_norm = self.grad_norm_tensor()
            clip_grad_by_total_norm_tensor(self.get_parameters(), self.config.clip_grad, grad_norm)
            found_inf = (~torch.isfinite(grad_norm)).float()
        if self.config.log_num_zeros_in_grad:
            num_zeros = count_zeros_tensor(self.get_parameters(), self.grad_stats_parallel_group, self.tp_group)
        if found_inf is None:
            self.optimizer.step()
        else:
            # The fused kernels leave params and moments alone (and undo the step count)
            # where found_inf is 1, as the host path skips ``step()`` on a NaN/Inf norm.
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        weights_updated()
        # On a skipped step the main params are unchanged, so this copy rewrites the values
        # the model params already hold.
        self._after_update()
        return DeviceStepResult(found_inf, grad_norm, num_zeros)

    def grad_norm_tensor(self) -> torch.Tensor:
        """The global grad norm (dense and expert parts) as a device tensor, no host sync."""
        return combined_grad_norm_tensor(
            (self.get_main_grads_for_grad_norm(), self.grad_stats_parallel_group),
            (self.get_expert_grads_for_grad_norm(), self.expert_grad_stats_parallel_group),
        )

    def _before_step(self) -> None:
        """Anything that must finish before the step reads or writes the params."""

    def _after_update(self) -> None:
        """After a taken step: the main params' new values to wherever the model reads them."""

    @abstractmethod
    def prepare_grads(self) -> bool:
        """Point the main params at their grads (unscaled); True when an fp16 overflow was found."""

    @abstractmethod
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the grads the optimizer reads."""

    @abstractmethod
    def get_loss_scale(self) -> torch.Tensor:
        """Current loss scale as a 1-element tensor."""

    @abstractmethod
    def reload_model_params(self) -> None:
        """Refresh main params from model params (after loading a model checkpoint)."""

    @abstractmethod
    def state_dict(self) -> dict:
        ...

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None:
        ...


class FP32Optimizer(MegatronOptimizer):
    """fp32 model params: the torch optimizer steps them directly, reading
    ``param.main_grad`` (the DDP buffer) as the grad."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        init_state_fn: Optional[Callable] = None,
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        super().__init__(optimizer, config, init_state_fn, pg_collection)
        params = self.get_parameters()
        device = params[0].device if params else torch.device("cpu")
        self._scale = torch.ones(1, dtype=torch.float32, device=device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.optimizer.param_groups:
            _zero_grad_group(group["params"], set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale

    def reload_model_params(self) -> None:
        """Model params are the main params: nothing to copy."""

    def prepare_grads(self) -> bool:
        """Point ``.grad`` at ``main_grad``; returns found_inf (always False here)."""
        for param in self.get_parameters():
            if hasattr(param, "main_grad"):
                param.grad = param.main_grad
        return False

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Float16OptimizerWithFloat16Params(MegatronOptimizer):
    """fp16/bf16 model params with fp32 main copies the torch optimizer steps.

    Each step: model grads (``main_grad``) -> fp32 main grads; with a grad scaler,
    unscale and check for NaN/Inf over the model-parallel group, skipping the step and
    backing the scale off on overflow; clip; step the fp32 main params; copy them back
    (cast) into the model params. fp32 params in the groups are stepped directly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        grad_scaler: Optional[MegatronGradScaler],
        init_state_fn: Optional[Callable] = None,
        pg_collection: Optional[ProcessGroups] = None,
    ) -> None:
        super().__init__(optimizer, config, init_state_fn, pg_collection)
        if config.fp16 and grad_scaler is None:
            raise ValueError("--fp16 needs a loss scaler: leave --loss-scale unset for dynamic scaling or give a value")
        self.grad_scaler = grad_scaler
        self.float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_fp32_groups: List[List[torch.Tensor]] = []
        for group in self.optimizer.param_groups:
            self._split_group(group)
        # Re-key any pre-existing per-param state onto the main params.
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        params = self.get_parameters()
        device = params[0].device if params else torch.device("cpu")
        self._scale_one = torch.ones(1, dtype=torch.float32, device=device)

    def _split_group(self, group: dict) -> None:
        float16, main, fp32 = [], [], []
        for i, param in enumerate(group["params"]):
            if param.dtype in (torch.float16, torch.bfloat16):
                main_param = param.detach().clone().float()
                for name in _COPIED_PARAM_ATTRIBUTES:
                    if hasattr(param, name):
                        setattr(main_param, name, getattr(param, name))
                param.main_param = main_param
                group["params"][i] = main_param
                if param in self.optimizer.state:
                    self.optimizer.state[main_param] = self.optimizer.state.pop(param)
                float16.append(param)
                main.append(main_param)
            elif param.dtype == torch.float32:
                fp32.append(param)
            else:
                raise TypeError(
                    f"optimizer params must be float16, bfloat16 or float32; got {param.dtype} for a param of shape {tuple(param.shape)}"
                )
        self.float16_groups.append(float16)
        self.fp32_from_float16_groups.append(main)
        self.fp32_from_fp32_groups.append(fp32)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for groups in (self.float16_groups, self.fp32_from_float16_groups, self.fp32_from_fp32_groups):
            for group in groups:
                _zero_grad_group(group, set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else self._scale_one

    def _copy_model_grads_to_main_grads(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                if hasattr(model_param, "main_grad"):
                    main_param.grad = model_param.main_grad.float()
                elif model_param.grad is not None:
                    main_param.grad = model_param.grad.float()
                # The model-dtype grad is no longer needed; free it now.
                model_param.grad = None
        for group in self.fp32_from_fp32_groups:
            for param in group:
                if hasattr(param, "main_grad"):
                    param.grad = param.main_grad

    def _copy_main_params_to_model_params(self) -> None:
        # One multi-tensor copy (with the cast) per group: a copy per parameter costs the
        # host a launch each, hundreds per step, while the GPU waits for the next step.
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            if model_group:
                torch._foreach_copy_([p.data for p in model_group], [p.data for p in main_group])

    def reload_model_params(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                main_param.data.copy_(model_param.data)

    def prepare_grads(self) -> bool:
        """Copy grads to the main params and unscale; returns found_inf (synced)."""
        self._copy_model_grads_to_main_grads()
        if self.grad_scaler is None:
            return False
        grads = [p.grad for p in self.get_parameters() if p.grad is not None]
        found_inf = unscale_and_check_for_nan(grads, self.grad_scaler.inv_scale, self.grad_stats_parallel_group)
        found = bool(found_inf.item() > 0)
        self.grad_scaler.update(found)
        return found

    def _after_update(self) -> None:
        self._copy_main_params_to_model_params()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        state["fp32_from_fp16_params"] = self.fp32_from_float16_groups
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        key = "optimizer" if "optimizer" in state_dict else "optimizer_state_dict"
        self.optimizer.load_state_dict(state_dict[key])
        if "grad_scaler" not in state_dict:
            if self.config.fp16:
                logger.info("no grad scaler state in the checkpoint: keeping the initial loss scale")
        elif self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        saved = state_dict["fp32_from_fp16_params"] if "fp32_from_fp16_params" in state_dict else state_dict["fp32_from_fp16"]
        for current_group, saved_group in zip(self.fp32_from_float16_groups, saved):
            for current, saved_param in zip(current_group, saved_group):
                current.data.copy_(saved_param.data)
