"""A Column -> GeLU -> Row MLP with --sequence-parallel equals the same block without it.

Both run on the same TP = 2 ranks from the same seed (--use-cpu-initialization, so the
weights are identical). With sequence parallelism each rank feeds its sequence block
[s/tp, b, h] and gets [s/tp, b, h] back; concatenated over ranks, outputs and input
gradients must equal the non-SP block's, weight gradients must be equal, and the
row-parallel bias gradient (marked ``sequence_parallel``) must sum over ranks to the
non-SP one. A serial plain-torch MLP is checked too.

Tolerance: as in test_layers (fp32, values up to ~15, additions only reordered by the
gathers/reductions): RTOL 1e-6, ATOL 1e-5.
"""

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import init_method_normal
from tests.multirank import run_on_ranks

RTOL, ATOL = 1e-6, 1e-5
S, B, H, FFN = 8, 2, 8, 16
SEED = 99


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _both_on_rank(rank, world):
    groups = parallel_state.initialize_model_parallel(world)
    return {sp: _mlp(rank, world, groups, sp) for sp in (True, False)}


def _mlp(rank, world, groups, sequence_parallel):
    config = ModelParallelConfig(
        tensor_model_parallel_size=world, sequence_parallel=sequence_parallel, use_cpu_initialization=True
    )
    torch.manual_seed(SEED)
    fc1 = ColumnParallelLinear(H, FFN, config=config, init_method=init_method_normal(1.0), tp_group=groups.tp)
    fc2 = RowParallelLinear(
        FFN, H, config=config, init_method=init_method_normal(1.0), bias=True,
        input_is_parallel=True, skip_bias_add=False, tp_group=groups.tp,
    )
    with torch.no_grad():
        fc1.bias.copy_(_randn(1, FFN).chunk(world)[rank])
        fc2.bias.copy_(_randn(2, H))
    x_full, grad_full = _randn(3, S, B, H), _randn(4, S, B, H)
    x = (x_full.chunk(world)[rank] if sequence_parallel else x_full).clone().requires_grad_()
    grad = grad_full.chunk(world)[rank] if sequence_parallel else grad_full
    y, _ = fc2(F.gelu(fc1(x)[0]))
    (y * grad).sum().backward()
    return dict(
        y=y.detach(), dx=x.grad, fc1_w=fc1.weight.grad, fc1_b=fc1.bias.grad, fc2_w=fc2.weight.grad,
        fc2_b=fc2.bias.grad, fc2_b_sp=fc2.bias.sequence_parallel,
    )


def _serial_mlp():
    torch.manual_seed(SEED)
    w1, w2 = torch.empty(FFN, H), torch.empty(H, FFN)
    init_method_normal(1.0)(w1)
    init_method_normal(1.0)(w2)
    params = [w1, _randn(1, FFN), w2, _randn(2, H)]
    for p in params:
        p.requires_grad_()
    x = _randn(3, S, B, H).requires_grad_()
    y = F.linear(F.gelu(F.linear(x, params[0], params[1])), params[2], params[3])
    (y * _randn(4, S, B, H)).sum().backward()
    return dict(y=y.detach(), dx=x.grad, fc1_w=params[0].grad, fc1_b=params[1].grad, fc2_w=params[2].grad, fc2_b=params[3].grad)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_sequence_parallel_mlp_equals_non_sequence_parallel():
    results = run_on_ranks(_both_on_rank, 2)
    sp, plain = [r[True] for r in results], [r[False] for r in results]
    assert all(r["fc2_b_sp"] for r in sp) and not any(r["fc2_b_sp"] for r in plain)
    _close(torch.cat([r["y"] for r in sp]), plain[0]["y"], "output")
    _close(torch.cat([r["dx"] for r in sp]), plain[0]["dx"], "input grad")
    _close(sum(r["fc2_b"] for r in sp), plain[0]["fc2_b"], "row bias grad summed over tp")
    for rank in range(2):
        for name in ("fc1_w", "fc1_b", "fc2_w"):
            _close(sp[rank][name], plain[rank][name], f"{name} rank {rank}")
    serial = _serial_mlp()
    _close(plain[0]["y"], serial["y"], "non-SP output vs serial")
    _close(plain[1]["dx"], serial["dx"], "non-SP input grad vs serial")
    _close(torch.cat([r["fc1_w"] for r in plain]), serial["fc1_w"], "fc1 weight grad vs serial")
    _close(torch.cat([r["fc1_b"] for r in plain]), serial["fc1_b"], "fc1 bias grad vs serial")
    _close(torch.cat([r["fc2_w"] for r in plain], 1), serial["fc2_w"], "fc2 weight grad vs serial")
    _close(plain[0]["fc2_b"], serial["fc2_b"], "fc2 bias grad vs serial")
