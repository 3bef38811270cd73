"""Gradient statistics over a model-parallel model: global norm, clipping, zero count,
finiteness.

Each param must be counted once across the model-parallel group. Params split over
tensor-parallel ranks carry ``tensor_model_parallel=True`` and count on every tp rank
(each holds a different shard); params without it are replicated over tp and count on
tp rank 0 only. Params with ``shared=True`` (a tied embedding's second copy) never
count. Local sums are then all-reduced over the model-parallel (tp x pp) group.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch
import torch.distributed as dist

from megatron.core.process_groups import group_rank, group_size


def all_reduce_grad_stat(stat: torch.Tensor, group, op=None) -> None:
    """Forward: reduce the statistic ``stat`` in place over ``group`` (SUM by default,
    MAX for the inf-norm and the found-inf flag). ``group`` may be a tuple of groups
    reduced one after the other, which reduces over their product (the distributed
    optimizer's shards: data-parallel, then model-parallel). Backward: not
    differentiable. No-op for 1-rank groups."""
    for one in group if isinstance(group, (tuple, list)) else (group,):
        if group_size(one) > 1:
            dist.all_reduce(stat, op=op or dist.ReduceOp.SUM, group=one)


def param_is_not_shared(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "shared", False)


def param_is_not_tensor_parallel_duplicate(param: torch.nn.Parameter, tp_group=None) -> bool:
    """True when ``param`` is a tp shard, or when this is tp rank 0 (which counts the
    replicated params for the whole tp group)."""
    return bool(getattr(param, "tensor_model_parallel", False)) or group_rank(tp_group) == 0


def main_grad_of(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The grad the optimizer steps with: ``param.decoupled_grad`` when set (the
    precision-aware optimizer's grads, whose dtype may differ from the param's, as in
    Megatron), else ``param.grad``."""
    grad = getattr(param, "decoupled_grad", None)
    return grad if grad is not None else param.grad


def _counted_grads(params: Iterable[torch.nn.Parameter], tp_group) -> List[torch.Tensor]:
    grads = [(p, main_grad_of(p)) for p in params]
    return [
        g for p, g in grads
        if g is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, tp_group)
    ]


def get_grads_for_norm(params: Iterable[torch.nn.Parameter], tp_group=None) -> List[torch.Tensor]:
    """The ``.grad`` of every param that this rank must count in the global norm."""
    return _counted_grads(params, tp_group)


def _device_of(tensors: List[torch.Tensor]) -> torch.device:
    if tensors:
        return tensors[0].device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_grad_norm_tensor(
    grads_for_norm: Union[torch.Tensor, List[torch.Tensor]],
    norm_type: Union[int, float] = 2,
    grad_stats_parallel_group=None,
) -> torch.Tensor:
    """Global ``norm_type`` norm of ``grads_for_norm`` (already filtered to count each
    param once) as a 0-dim fp32 tensor, without a host sync."""
    grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
    device = _device_of(grads)
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        local = [g.detach().abs().max().float() for g in grads]
        total = torch.stack(local).max() if local else torch.zeros((), device=device)
        all_reduce_grad_stat(total, grad_stats_parallel_group, op=dist.ReduceOp.MAX)
        return total
    if grads:
        # fp32 accumulation and result also for bf16 grads (--main-grads-dtype bf16).
        norms = torch._foreach_norm([g.detach() for g in grads], norm_type, dtype=torch.float32)
        total = torch.stack([n.float() for n in norms]).pow(norm_type).sum()
    else:
        total = torch.zeros((), device=device)
    all_reduce_grad_stat(total, grad_stats_parallel_group)
    return total.pow(1.0 / norm_type)


def get_grad_norm_fp32(
    grads_for_norm: Union[torch.Tensor, List[torch.Tensor]],
    norm_type: Union[int, float] = 2,
    grad_stats_parallel_group=None,
) -> float:
    """Global norm as a Python float (the one host sync, for logging and clipping).

    NaN/Inf in any grad makes the result NaN/Inf, which callers treat as a bad step.
    """
    return get_grad_norm_tensor(grads_for_norm, norm_type, grad_stats_parallel_group).item()


def combined_grad_norm_tensor(*parts, norm_type: Union[int, float] = 2) -> torch.Tensor:
    """Global norm over several (grads_for_norm, grad_stats_parallel_group) parts, such as
    dense params reduced over the model-parallel group and expert params reduced over the
    expert model-parallel group, as a 0-dim fp32 tensor, without a host sync. Every rank
    must pass the same parts (an empty grad list still takes part in its group's reduction)."""
    norms = torch.stack([get_grad_norm_tensor(grads, norm_type, group) for grads, group in parts])
    if float(norm_type) == float("inf"):
        return norms.max()
    return norms.pow(float(norm_type)).sum().pow(1.0 / float(norm_type))


def combined_grad_norm(*parts, norm_type: Union[int, float] = 2) -> float:
    """``combined_grad_norm_tensor`` as a Python float (one host sync)."""
    return combined_grad_norm_tensor(*parts, norm_type=norm_type).item()


def clip_grad_by_total_norm_fp32(
    parameters: Union[torch.nn.Parameter, Iterable[torch.nn.Parameter]],
    max_norm: Union[int, float],
    total_norm: float,
) -> None:
    """Scale the ``.grad`` of ``parameters`` by max_norm / total_norm when that is < 1.

    A non-finite ``total_norm`` clips nothing (the step is skipped by the optimizer).
    """
    grads = _grads_of(parameters)
    clip_coeff = float(max_norm) / (total_norm + 1.0e-6)
    if grads and clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def clip_grad_by_total_norm_tensor(
    parameters: Union[torch.nn.Parameter, Iterable[torch.nn.Parameter]],
    max_norm: Union[int, float],
    total_norm: torch.Tensor,
) -> None:
    """``clip_grad_by_total_norm_fp32`` with the norm on the device and no host sync: the
    grads are always multiplied, by 1 when no clipping is due. The coefficient is formed in
    float64 and rounded to fp32 as the host path's Python float is, so both give the same
    bits. A non-finite norm makes the grads non-finite; the optimizer then skips the step."""
    grads = _grads_of(parameters)
    if grads:
        clip_coeff = (float(max_norm) / (total_norm.double() + 1.0e-6)).clamp(max=1.0).float()
        torch._foreach_mul_(grads, clip_coeff)


def _grads_of(parameters) -> List[torch.Tensor]:
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    return [g.detach() for g in map(main_grad_of, params) if g is not None]


def count_zeros_fp32(
    parameters: Iterable[torch.nn.Parameter],
    grad_stats_parallel_group=None,
    tp_group=None,
) -> float:
    """Number of zero grad entries over the model, each param counted once."""
    return count_zeros_tensor(parameters, grad_stats_parallel_group, tp_group).item()


def count_zeros_tensor(
    parameters: Iterable[torch.nn.Parameter],
    grad_stats_parallel_group=None,
    tp_group=None,
) -> torch.Tensor:
    """``count_zeros_fp32`` as a 0-dim fp32 tensor, without a host sync."""
    grads = _counted_grads(parameters, tp_group)
    device = _device_of(grads)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += g.numel() - torch.count_nonzero(g)
    all_reduce_grad_stat(total, grad_stats_parallel_group)
    return total


def unscale_and_check_for_nan(
    grads: List[torch.Tensor], inv_scale: torch.Tensor, grad_stats_parallel_group=None
) -> torch.Tensor:
    """Multiply ``grads`` in place by ``inv_scale`` and return a 1-element fp32 flag,
    > 0 when any grad on any rank of the group holds NaN/Inf (MAX-reduced, no sync)."""
    device = _device_of(grads)
    found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale.to(device))
    all_reduce_grad_stat(found_inf, grad_stats_parallel_group, op=dist.ReduceOp.MAX)
    return found_inf


def grads_are_finite(grads: List[torch.Tensor], grad_stats_parallel_group=None) -> bool:
    """True when no grad on any rank of the group holds NaN/Inf (one host sync)."""
    flag = torch.zeros(1, dtype=torch.float32, device=_device_of(grads))
    if grads:
        # The max-abs norm is NaN/Inf exactly when an entry is; it never overflows.
        max_abs = torch.stack([n.float() for n in torch._foreach_norm([g.detach() for g in grads], float("inf"))])
        flag = (~torch.isfinite(max_abs)).any().float().reshape(1)
    all_reduce_grad_stat(flag, grad_stats_parallel_group, op=dist.ReduceOp.MAX)
    return flag.item() == 0
