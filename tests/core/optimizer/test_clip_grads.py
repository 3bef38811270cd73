"""Global grad norm over 2 tensor-parallel ranks equals the full model's norm."""

import math

import torch

from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    get_grad_norm_fp32,
    get_grads_for_norm,
    grads_are_finite,
    unscale_and_check_for_nan,
)
from tests.multirank import run_on_ranks


def _full_grads():
    """Grads of the unsplit model: a column-split weight, a replicated bias and a
    replicated norm weight; some exact zeros for the zero count."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=g)
    weight[0, :3] = 0.0
    bias = torch.randn(3, generator=g) * 3.0
    bias[1] = 0.0
    norm_w = torch.randn(5, generator=g) * 2.0
    return weight, bias, norm_w


def _rank_params(tp_rank):
    weight, bias, norm_w = _full_grads()
    shard = torch.nn.Parameter(torch.zeros(2, 6))
    shard.tensor_model_parallel = True
    shard.grad = weight[2 * tp_rank: 2 * tp_rank + 2].clone()
    dup_b = torch.nn.Parameter(torch.zeros(3))
    dup_b.grad = bias.clone()
    dup_n = torch.nn.Parameter(torch.zeros(5))
    dup_n.grad = norm_w.clone()
    return [shard, dup_b, dup_n]


def _on_rank(rank, world_size):
    groups = parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    params = _rank_params(rank)
    out = {}
    grads = get_grads_for_norm(params, groups.tp)
    out["l2"] = get_grad_norm_fp32(grads, 2, groups.mp)
    out["inf"] = get_grad_norm_fp32(grads, float("inf"), groups.mp)
    out["zeros"] = count_zeros_fp32(params, groups.mp, groups.tp)
    # Every param counted on every rank: what a missing duplicate filter would give.
    out["naive"] = get_grad_norm_fp32([p.grad for p in params], 2, groups.mp)
    clip_grad_by_total_norm_fp32(params, out["l2"] / 2, out["l2"])
    out["after_clip"] = get_grad_norm_fp32(get_grads_for_norm(params, groups.tp), 2, groups.mp)
    # The optimizer does the same selection: its grad norm is the full model's.
    fresh = _rank_params(rank)
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.0, clip_grad=1e9, optimizer="sgd"), [torch.nn.ParameterList(fresh)])
    out["optimizer_norm"] = opt.step()[1]
    # An inf on tp rank 1 only must be seen by both ranks.
    bad = [p.grad.clone() for p in _rank_params(rank)]
    if rank == 1:
        bad[0][1, 1] = float("inf")
    out["finite"] = grads_are_finite(bad, groups.mp)
    out["found_inf"] = unscale_and_check_for_nan(bad, torch.tensor(0.5), groups.mp).item()
    return out


def test_grad_norm_counts_each_param_once_across_tp():
    results = run_on_ranks(_on_rank, 2)
    weight, bias, norm_w = _full_grads()
    full = torch.cat([weight.flatten(), bias, norm_w])
    expected = full.norm().item()
    twice = math.sqrt(weight.norm() ** 2 + 2 * bias.norm() ** 2 + 2 * norm_w.norm() ** 2)
    # The duplicated params are large enough that counting them twice is far off.
    assert abs(twice - expected) > 0.1 * expected
    for res in results:
        # fp32 sums of ~40 terms in a different order: relative error ~1e-7.
        assert math.isclose(res["l2"], expected, rel_tol=1e-6)
        assert math.isclose(res["naive"], twice, rel_tol=1e-6)
        assert not math.isclose(res["naive"], expected, rel_tol=1e-2)
        assert res["inf"] == full.abs().max().item()
        assert res["zeros"] == 4
        assert math.isclose(res["after_clip"], expected / 2, rel_tol=1e-5)
        assert math.isclose(res["optimizer_norm"], expected, rel_tol=1e-6)
        assert res["finite"] is False
        assert res["found_inf"] == 1.0
