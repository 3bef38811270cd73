"""The overlapped tensor-parallel matmuls equal their serial definitions.

- The ring all-gather + matmul and ring matmul + reduce-scatter (--tp-comm-overlap) give
  the all-gathered / reduce-scattered products on 2 and 3 ranks.
- A Column -> GeLU -> Row MLP with --sequence-parallel --tp-comm-overlap gives the same
  outputs and gradients as without the overlap, on 2 ranks.
- Gradient accumulation fusion adds the weight gradient into ``main_grad`` over several
  backward passes (and marks the parameter), leaves weights without ``main_grad`` on the
  ordinary path, and never fuses a weight passed in from outside (the tied output layer),
  whose ``.grad`` must also receive the embedding's gradient.

Tolerance: fp32 with sums only reordered: RTOL 1e-6, ATOL 1e-5 (values are O(1-10)); a
missing block or a wrong peer is off by O(1).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.linear_with_comm import (
    column_parallel_matmul,
    ring_all_gather_matmul,
    ring_matmul_reduce_scatter,
)
from megatron.core.transformer.transformer_config import init_method_normal
from tests.multirank import run_on_ranks

RTOL, ATOL = 1e-6, 1e-5
S, B, H, FFN = 12, 2, 8, 16


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rings_on_rank(rank, world):
    groups = parallel_state.initialize_model_parallel(world)
    n = S // world
    x_full = _randn(1, S, B, H)
    w = _randn(2, FFN, H)
    out, gathered = ring_all_gather_matmul(
        x_full[rank * n:(rank + 1) * n], lambda block, o: torch.matmul(block, w.t(), out=o), FFN, groups.tp)
    # every rank holds its own [S, B, H] input: the reduce-scatter sums rank-dependent partials
    per_rank = [_randn(10 + r, S, B, H) for r in range(world)]
    reduced = ring_matmul_reduce_scatter(per_rank[rank], lambda block: block.matmul(w.t()), groups.tp)
    expected_reduced = sum(p.matmul(w.t()) for p in per_rank)[rank * n:(rank + 1) * n]
    return out, gathered, x_full.matmul(w.t()), x_full, reduced, expected_reduced


@pytest.mark.parametrize("world", [2, 3])
def test_rings_equal_collective_then_matmul(world):
    for out, gathered, expected_out, x_full, reduced, expected_reduced in run_on_ranks(_rings_on_rank, world):
        torch.testing.assert_close(gathered, x_full, rtol=0, atol=0)
        torch.testing.assert_close(out, expected_out, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(reduced, expected_reduced, rtol=RTOL, atol=ATOL)


def _mlp(rank, world, groups, overlap):
    config = ModelParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True,
                                 use_cpu_initialization=True)
    config.tp_comm_overlap = overlap
    torch.manual_seed(5)
    fc1 = ColumnParallelLinear(H, FFN, config=config, init_method=init_method_normal(1.0), tp_group=groups.tp)
    fc2 = RowParallelLinear(FFN, H, config=config, init_method=init_method_normal(1.0), bias=True,
                            input_is_parallel=True, skip_bias_add=False, tp_group=groups.tp)
    with torch.no_grad():
        fc1.bias.copy_(_randn(1, FFN).chunk(world)[rank])
        fc2.bias.copy_(_randn(2, H))
    n = S // world
    x = _randn(3, S, B, H)[rank * n:(rank + 1) * n].clone().requires_grad_()
    y, _ = fc2(F.gelu(fc1(x)[0]))
    (y * _randn(4, S, B, H)[rank * n:(rank + 1) * n]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, fc1_w=fc1.weight.grad, fc1_b=fc1.bias.grad, fc2_w=fc2.weight.grad,
                fc2_b=fc2.bias.grad)


def _overlap_on_rank(rank, world):
    groups = parallel_state.initialize_model_parallel(world)
    return _mlp(rank, world, groups, True), _mlp(rank, world, groups, False)


def test_sequence_parallel_mlp_with_comm_overlap_equals_without():
    for overlapped, plain in run_on_ranks(_overlap_on_rank, 2):
        for key in plain:
            torch.testing.assert_close(overlapped[key], plain[key], rtol=RTOL, atol=ATOL, msg=key)


def test_gradient_accumulation_fusion_adds_into_main_grad():
    config = ModelParallelConfig(use_cpu_initialization=True)
    config.gradient_accumulation_fusion = True
    layer = ColumnParallelLinear(H, FFN, config=config, init_method=init_method_normal(1.0))
    reference = layer.weight.detach().clone().requires_grad_()
    layer.weight.main_grad = torch.zeros_like(layer.weight)
    for seed in (1, 2):
        x = _randn(seed, S, B, H)
        layer(x)[0].square().sum().backward()
        F.linear(x, reference, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.main_grad, reference.grad, rtol=RTOL, atol=ATOL)
    assert layer.weight.grad_added_to_main_grad
    # without a main_grad buffer the ordinary gradient comes back
    plain = ColumnParallelLinear(H, FFN, config=config, init_method=init_method_normal(1.0))
    x = _randn(3, S, B, H)
    plain(x)[0].sum().backward()
    torch.testing.assert_close(plain.weight.grad, torch.ones(S * B, FFN).t().matmul(x.reshape(-1, H)))


def test_weight_passed_in_is_not_fused():
    """The tied output layer: the weight's gradient must arrive in .grad, summed with the
    embedding lookup's, because main_grad only receives .grad through the hook."""
    config = ModelParallelConfig(use_cpu_initialization=True)
    config.gradient_accumulation_fusion = True
    layer = ColumnParallelLinear(H, FFN, config=config, init_method=init_method_normal(1.0), bias=False,
                                 skip_weight_param_allocation=True)
    shared = torch.nn.Parameter(_randn(5, FFN, H))
    shared.main_grad = torch.zeros_like(shared)
    x = _randn(6, S, B, H)
    ids = torch.tensor([0, 3])
    (layer(x, weight=shared)[0].sum() + F.embedding(ids, shared).sum()).backward()
    expected = torch.ones(S * B, FFN).t().matmul(x.reshape(-1, H))
    expected[ids] += 1.0
    torch.testing.assert_close(shared.grad, expected, rtol=RTOL, atol=ATOL)
    assert not getattr(shared, "grad_added_to_main_grad", False)
    assert shared.main_grad.abs().sum() == 0


def test_column_matmul_without_group_is_plain_linear():
    x, w, b = _randn(7, S, B, H).requires_grad_(), _randn(8, FFN, H).requires_grad_(), _randn(9, FFN)
    y = column_parallel_matmul(x, w, b, None, sequence_parallel=False, tp_comm_overlap=False,
                               fuse_accumulation=False)
    torch.testing.assert_close(y, F.linear(x, w, b))


@pytest.mark.gpu
def test_bf16_weight_gradient_accumulates_in_fp32_main_grad_on_gpu():
    """On CUDA the bf16 weight-gradient GEMM writes into the fp32 main_grad itself
    (addmm with out_dtype); equal to the fp32 sum of the bf16 gradients within bf16 GEMM
    rounding (inputs are exact in bf16, products accumulate in fp32)."""
    from megatron.core.tensor_parallel import linear_with_comm

    config = ModelParallelConfig(params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=True)
    config.gradient_accumulation_fusion = True
    torch.manual_seed(0)
    layer = ColumnParallelLinear(512, 1024, config=config, init_method=init_method_normal(0.02), bias=False).cuda()
    layer.weight.main_grad = torch.zeros(layer.weight.shape, dtype=torch.float32, device="cuda")
    expected = torch.zeros_like(layer.weight.main_grad)
    for seed in range(3):
        x = torch.randn(256, 4, 512, generator=torch.Generator().manual_seed(seed)).cuda().bfloat16()
        g = torch.randn(256, 4, 1024, generator=torch.Generator().manual_seed(100 + seed)).cuda().bfloat16()
        layer(x)[0].backward(g)
        expected += g.reshape(-1, 1024).float().t().matmul(x.reshape(-1, 512).float())
    assert linear_with_comm._FP32_ACCUMULATE_OK is True
    torch.testing.assert_close(layer.weight.main_grad, expected, rtol=1e-4, atol=1e-3)
