"""The column-parallel FP8 linear gathers a sequence-parallel input in FP8: each rank
quantizes its block with the whole sequence's scale and the FP8 blocks are all-gathered.
On two gloo ranks (the emulation backend), the output, both gradients and the scaling state
equal, bit for bit, those of gathering the high-precision input and quantizing it after
(the path --no-fp8-wgrad keeps), over three calls of both recipes."""

import pytest
import torch

from tests.multirank import run_on_ranks

SEQ, BATCH, K, N = 8, 2, 32, 24


def _rank(rank, world, recipe):
    import megatron.core.fp8.linear as fp8_linear_module
    from megatron.core import parallel_state
    from megatron.core.fp8.gemm import EMULATION
    from megatron.core.fp8.recipe import Fp8Recipe
    from megatron.core.fp8.scaling import Fp8Scaling

    parallel_state.initialize_model_parallel(world)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for in_fp8 in (True, False):
        fp8_linear_module.gathers_in_fp8 = lambda scaling, weight, on=in_fp8: on
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(N, K))  # this rank's columns: the same on both ranks here
        scaling = Fp8Scaling(Fp8Recipe(fmt="hybrid", recipe=recipe, amax_history_len=3, amax_compute_algo="max",
                                       emulation=True))
        results = []
        for step in range(3):
            torch.manual_seed(10 + step)
            full = torch.randn(SEQ, BATCH, K) * (step + 1)
            x = full.chunk(world, dim=0)[rank].clone().requires_grad_()
            y = fp8_linear_module.fp8_column_parallel(x, weight, None, scaling, group, sequence_parallel=True,
                                                      fuse_accumulation=False, backend=EMULATION)
            y.backward(torch.randn(SEQ, BATCH, N, generator=torch.Generator().manual_seed(20 + step)))
            results += [y.detach(), x.grad]
        out[in_fp8] = dict(results=results, wgrad=weight.grad.clone(), history=scaling.amax_history.clone(),
                           scale=scaling.scale.clone())
    return out


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_gather_equals_gathering_then_quantizing(recipe):
    for rank, out in enumerate(run_on_ranks(_rank, 2, args=(recipe,))):
        fp8, high = out[True], out[False]
        assert fp8["results"][0].shape == (SEQ, BATCH, N) and fp8["results"][1].shape == (SEQ // 2, BATCH, K)
        for a, b in zip(fp8["results"], high["results"]):
            assert torch.equal(a, b), f"rank {rank}"
        assert torch.equal(fp8["wgrad"], high["wgrad"]), f"rank {rank}"
        assert torch.equal(fp8["history"], high["history"]) and torch.equal(fp8["scale"], high["scale"])
        assert (fp8["history"] > 0).any()  # the state moved


def test_no_fp8_wgrad_gathers_the_high_precision_input():
    from megatron.core.fp8.linear import gathers_in_fp8
    from megatron.core.fp8.recipe import Fp8Recipe
    from megatron.core.fp8.scaling import Fp8Scaling

    weight = torch.nn.Parameter(torch.randn(4, 4))
    assert gathers_in_fp8(Fp8Scaling(Fp8Recipe(fmt="hybrid")), weight)
    no_wgrad = Fp8Scaling(Fp8Recipe(fmt="hybrid", wgrad=False))
    assert not gathers_in_fp8(no_wgrad, weight)
    weight.requires_grad_(False)
    assert gathers_in_fp8(no_wgrad, weight)  # no weight gradient to compute
