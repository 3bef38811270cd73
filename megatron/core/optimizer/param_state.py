"""Optimizer state in model space: per model param, full (data-parallel-unsharded) tensors
of the param's own shape, for checkpoints that reshard.

For every model param: ``fp32_param`` (the fp32 main copy; only when the model param is
fp16/bf16, otherwise the model weight is the main param) and the optimizer's per-element
states (Adam: ``exp_avg``, ``exp_avg_sq``; SGD with momentum: ``momentum_buffer``; Lion:
``exp_avg``). The
optimizer's step count is a scalar common to all params.

The plain and mixed-precision optimizers hand out their live tensors; the distributed
optimizer gathers its data-parallel shards first (collective over the data-parallel
groups) and, on load, each rank keeps the piece it owns.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.lion import Lion
from megatron.core.optimizer.precision_aware_adam import PrecisionAwareAdamW
from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params, MegatronOptimizer

ParamState = Dict[str, torch.Tensor]


def per_element_state_keys(optimizer: MegatronOptimizer) -> Tuple[str, ...]:
    inner = optimizer.optimizer
    if isinstance(inner, PrecisionAwareAdamW):
        return ("exp_avg", "exp_avg_sq")
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if inner.defaults.get("amsgrad") else ())
    if isinstance(inner, torch.optim.SGD):
        return ("momentum_buffer",) if inner.defaults.get("momentum", 0) else ()
    if isinstance(inner, Lion):
        return ("exp_avg",)
    raise TypeError(f"checkpointing {type(inner).__name__} state is not supported (Adam, AdamW, SGD, Lion and the "
                    f"precision-aware AdamW are)")


def _main_params(optimizer: MegatronOptimizer) -> Iterator[Tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model param, fp32 main param) for the non-distributed optimizers."""
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            yield from zip(model_group, main_group)
        for group in optimizer.fp32_from_fp32_groups:
            for param in group:
                yield param, param
    elif isinstance(optimizer, FP32Optimizer):
        for group in optimizer.optimizer.param_groups:
            for param in group["params"]:
                yield param, param
    else:
        raise TypeError(f"no model-space state for {type(optimizer).__name__}")


def _step_of(state: dict) -> Optional[float]:
    step = state.get("step")
    if step is None:
        return None
    return float(step.item() if torch.is_tensor(step) else step)


def model_space_state(optimizer: MegatronOptimizer) -> Tuple[Dict[torch.nn.Parameter, ParamState], dict]:
    """({model param: {state name: tensor of the param's shape}}, scalars). ``scalars``:
    ``has_state`` (False before the first step) and ``step`` (Adam's count, else None).
    Zeros stand for states that do not exist yet."""
    keys = per_element_state_keys(optimizer)
    if isinstance(optimizer, DistributedOptimizer):
        return _gathered_distributed_state(optimizer, keys)
    result: Dict[torch.nn.Parameter, ParamState] = {}
    step, has_state = None, False
    for model_param, main_param in _main_params(optimizer):
        state = optimizer.optimizer.state.get(main_param, {})
        has_state = has_state or bool(state)
        step = step if step is not None else _step_of(state)
        entry = {}
        if main_param is not model_param:
            entry["fp32_param"] = main_param.detach()
        for key in keys:
            value = state.get(key)
            entry[key] = value.detach() if value is not None else torch.zeros_like(main_param)
        result[model_param] = entry
    return result, {"has_state": has_state, "step": step}


def _gathered_distributed_state(optimizer: DistributedOptimizer, keys) -> Tuple[Dict[torch.nn.Parameter, ParamState], dict]:
    full = optimizer.get_parameter_state_dp_zero()
    result: Dict[torch.nn.Parameter, ParamState] = {}
    for buffer, buckets in zip(optimizer.buffers, full["buckets"]):
        layout = buffer.layout
        for param, (start, end), bucket_id in zip(buffer.param_index_map, layout.param_ranges,
                                                   layout.bucket_of_param):
            bucket_start = layout.bucket_ranges[bucket_id][0]
            flat = buckets[bucket_id]
            entry = {key: flat[key][start - bucket_start:end - bucket_start].view(param.shape) for key in keys}
            if param.dtype != torch.float32:
                entry["fp32_param"] = flat["param"][start - bucket_start:end - bucket_start].view(param.shape)
            result[param] = entry
    scalars = full.get("scalar_state")
    step = None if scalars is None else _step_of(scalars)
    return result, {"has_state": scalars is not None, "step": step}


def empty_model_space_state(optimizer: MegatronOptimizer) -> Dict[torch.nn.Parameter, ParamState]:
    """Zero destination tensors, one set per model param, for a checkpoint to fill."""
    keys = per_element_state_keys(optimizer)
    params: List[torch.nn.Parameter]
    if isinstance(optimizer, DistributedOptimizer):
        params = [p for buffer in optimizer.buffers for p in buffer.param_index_map]
    else:
        params = [p for p, _ in _main_params(optimizer)]
    result = {}
    for param in params:
        entry = {key: torch.zeros(param.shape, dtype=torch.float32, device=param.device) for key in keys}
        if param.dtype != torch.float32:
            entry["fp32_param"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        result[param] = entry
    return result


def _step_value(step: float, like: Optional[torch.Tensor]) -> torch.Tensor:
    # torch keeps Adam's step on the CPU unless the optimizer is fused or capturable.
    device = like.device if like is not None else "cpu"
    return torch.tensor(step, dtype=torch.float32, device=device)


def load_model_space_state(optimizer: MegatronOptimizer, states: Dict[torch.nn.Parameter, ParamState],
                           scalars: dict, load_fp32_params: bool = True) -> None:
    """Install ``states`` (as made by ``empty_model_space_state`` and filled from a
    checkpoint) with the ``scalars`` of ``model_space_state``. Without saved state (the
    optimizer had not stepped) only the fp32 params are restored. Call after the model
    weights are loaded."""
    keys = per_element_state_keys(optimizer)
    step = scalars.get("step")
    extra = None
    if scalars.get("has_state"):
        extra = {} if step is None else {"step": step}
    inner = optimizer.optimizer
    fused = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    if isinstance(optimizer, DistributedOptimizer):
        for shard in optimizer._all_shards():
            entry = states[shard.model_param]
            lo, hi = shard.range.param
            source = entry.get("fp32_param") if load_fp32_params else None
            source = source if source is not None else shard.model_param.detach().float()
            values = {"param": source.reshape(-1)[lo:hi]}
            values.update({key: entry[key].reshape(-1)[lo:hi] for key in keys})
            optimizer._set_shard_state(shard, values, None if extra is None else
                                       {k: _step_value(v, shard.main_param if fused else None)
                                        for k, v in extra.items()})
        optimizer.main_params_changed()
        return
    for model_param, main_param in _main_params(optimizer):
        entry = states[model_param]
        if main_param is not model_param:
            with torch.no_grad():
                main_param.copy_(entry["fp32_param"] if load_fp32_params else model_param.float())
        if extra is None:
            inner.state.pop(main_param, None)
            continue
        state = {key: entry[key].to(main_param.device).clone() for key in keys}
        state.update({k: _step_value(v, main_param if fused else None) for k, v in extra.items()})
        inner.state[main_param] = state


def install_main_params(optimizer: MegatronOptimizer, fp32_params: Dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """The fp32 main copies of the model params from ``fp32_params`` (model param -> fp32
    tensor of its shape, read from a checkpoint), the optimizer's moments left alone
    (--load-main-params-from-ckpt). Params not in ``fp32_params`` get their model weight."""
    with torch.no_grad():
        if isinstance(optimizer, DistributedOptimizer):
            for shard in optimizer._all_shards():
                lo, hi = shard.range.param
                source = fp32_params.get(shard.model_param)
                source = source if source is not None else shard.model_param.detach().float()
                piece = source.reshape(-1)[lo:hi]
                if optimizer.precision_aware and optimizer.optimizer.needs_master(shard.main_param):
                    optimizer.optimizer.set_unscaled(shard.main_param, "master_param", piece)
                else:
                    shard.main_param.copy_(piece.view_as(shard.main_param))
            optimizer.main_params_changed()
            return
        for model_param, main_param in _main_params(optimizer):
            if main_param is not model_param:
                source = fp32_params.get(model_param)
                main_param.copy_(source if source is not None else model_param.float())
