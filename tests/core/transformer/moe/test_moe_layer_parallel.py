"""An MoE layer split over expert, tensor and data parallel ranks computes what one
process computes: outputs, input gradients, expert and router gradients.

Tolerance: the same fp32 products, with sums over experts and ranks in another order
(reduce-scatter / all-to-all then index_add): differences of float32 rounding, ~1e-7
relative; 1e-5 is far below any routing or permutation error (order 1e-1).
"""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from tests.core.transformer.moe.moe_cases import BATCH, SEQ, build_layer, inputs, moe_config
from tests.multirank import run_on_ranks

TOL = dict(atol=1e-5, rtol=1e-5)


def _sum_over(tensor, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def _run_parallel(rank, world_size, tp, ep, etp, sp, dispatcher):
    groups = parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep,
                                                      expert_tensor_parallel_size=etp)
    config = moe_config(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                        expert_tensor_parallel_size=etp, sequence_parallel=sp,
                        moe_token_dispatcher_type=dispatcher)
    layer = build_layer(config, groups)
    hidden, grad = inputs()
    dp, dp_rank, tp_rank = groups.size("dp"), groups.rank("dp"), groups.rank("tp")
    cols = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    rows = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp) if sp else slice(0, SEQ)
    x = hidden[rows, cols].clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad[rows, cols])
    router_grad = layer.router.weight.grad.clone()
    if sp:
        _sum_over(router_grad, groups.tp)
    _sum_over(router_grad, groups.dp)
    fc2 = {}
    for index, expert in zip(layer.local_expert_indices, layer.experts.local_experts):
        g = _sum_over(expert.linear_fc2.weight.grad.clone(), groups.expt_dp)
        fc2[index] = (g, groups.rank("expt_tp"), groups.size("expt_tp"))
    return {"rows": rows, "cols": cols, "out": out.detach(), "x_grad": x.grad, "router": router_grad, "fc2": fc2}


@pytest.fixture(scope="module")
def reference():
    layer = build_layer(moe_config())
    hidden, grad = inputs()
    x = hidden.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad)
    fc2 = [e.linear_fc2.weight.grad for e in layer.experts.local_experts]
    return {"out": out.detach(), "x_grad": x.grad, "router": layer.router.weight.grad, "fc2": fc2}


@pytest.mark.parametrize(
    "tp, ep, etp, sp, dispatcher",
    # etp1 with alltoall sends every (token, expert) pair once: the gather-based combine.
    [(2, 2, 2, True, "alltoall"), (2, 2, 1, False, "allgather"), (1, 2, 1, False, "alltoall")],
    ids=["tp2-ep2-etp2-sp-alltoall", "tp2-ep2-etp1-allgather", "ep2-dp2-alltoall"],
)
def test_parallel_layer_matches_one_process(reference, tp, ep, etp, sp, dispatcher):
    results = run_on_ranks(_run_parallel, 4, args=(tp, ep, etp, sp, dispatcher))
    for res in results:
        torch.testing.assert_close(res["out"], reference["out"][res["rows"], res["cols"]], **TOL)
        torch.testing.assert_close(res["x_grad"], reference["x_grad"][res["rows"], res["cols"]], **TOL)
        torch.testing.assert_close(res["router"], reference["router"], **TOL)
        for index, (grad, shard, shards) in res["fc2"].items():
            full = reference["fc2"][index]
            width = full.size(1) // shards
            torch.testing.assert_close(grad, full[:, shard * width:(shard + 1) * width], **TOL)
