"""Our FP8 linear (``tensorwise`` recipe) against torchao's float8 training, the library's
``Float8Linear``, both in their CPU emulation: the same numerics.

torchao's ``tensorwise`` recipe is current scaling with one scale per tensor: input and
weight in e4m3, the output gradient in e5m2 (our ``--fp8-format hybrid``), or e4m3 when
configured so (our ``--fp8-format e4m3``), scale = fp8_max / amax (no margin, not rounded to
a power of two). An independent implementation of the format agreeing with ours checks the
amax, the scale, the saturation, which operand each backward GEMM quantizes and in which
format.

Tolerance: fp32 operands. Both quantize to the same FP8 values; the emulations differ in
where the dequantization rounds (torchao multiplies the FP8 values by the inverse scale in
the operand dtype before its GEMM, ours folds the scales into the fp32 GEMM), which moves
results by ~2e-7 of their largest entry. 1e-5 is far below what a real difference does:
e4m3 gradients where e5m2 belong move the input gradient by ~6% and the weight gradient by
~7% (the last test). (In bf16 the two differ by one bf16 unit in a few entries, from that
same rounding, so bf16 is not compared.)
"""

import dataclasses
import importlib.util

import pytest
import torch

from megatron.core.fp8.gemm import EMULATION
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling
from tests.multirank import run_on_ranks

# torchao is imported in a child process only: its import registers operators and
# torch.compile hooks that the rest of the suite should not run with.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


def _torchao_config(fmt: str):
    import torchao.float8 as torchao_float8
    from torchao.float8.config import CastConfig

    config = torchao_float8.Float8LinearConfig.from_recipe_name("tensorwise")
    if fmt == "e4m3":
        e4m3 = CastConfig(target_dtype=torch.float8_e4m3fn)
        config = dataclasses.replace(config, cast_config_grad_output=e4m3, cast_config_grad_output_for_grad_weight=e4m3)
    return dataclasses.replace(config, emulate=True)


def _ours(x, w, g, fmt):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    scaling = Fp8Scaling(Fp8Recipe(fmt=fmt, recipe="tensorwise", emulation=True), device=torch.device("cpu"))
    y = fp8_linear(x, w, scaling, backend=EMULATION)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _torchao(x, w, g, fmt):
    import torchao.float8 as torchao_float8

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    model = torchao_float8.convert_to_float8_training(torch.nn.Sequential(linear), config=_torchao_config(fmt))
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, model[0].weight.grad


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("shape", [(64, 32, 48), (2, 40, 64, 96)], ids=["2d", "3d-input"])
def test_tensorwise_linear_equals_torchao_bit_for_bit(fmt, shape):
    torch.manual_seed(0)
    *lead, k, n = shape
    # activations of several magnitudes, one outlier that sets the amax, gradients small
    x = torch.randn(*lead, k) * 2
    x.view(-1)[7] = 300.0
    w = torch.randn(n, k) * 0.05
    g = torch.randn(*lead, n) * 1e-3
    errors = _compare_in_a_child(x, w, g, fmt, fmt)
    for name, error in zip(("output", "input gradient", "weight gradient"), errors):
        assert error < 1e-5, f"{name}: {error}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _compare(rank, world, x, w, g, ours_fmt, torchao_fmt):
    ours, theirs = _ours(x, w, g, ours_fmt), _torchao(x, w, g, torchao_fmt)
    return [_relative(a, b) for a, b in zip(ours, theirs)]


def _compare_in_a_child(x, w, g, ours_fmt, torchao_fmt):
    """Relative differences of (output, input gradient, weight gradient), ours against torchao's."""
    return run_on_ranks(_compare, 1, args=(x, w, g, ours_fmt, torchao_fmt))[0]


def test_a_wrong_gradient_format_is_seen():
    """The comparison can fail: e4m3 gradients against torchao's e5m2 ones differ."""
    torch.manual_seed(0)
    x, w, g = torch.randn(64, 32), torch.randn(48, 32) * 0.05, torch.randn(64, 48)
    output, input_gradient, weight_gradient = _compare_in_a_child(x, w, g, "e4m3", "hybrid")
    assert output < 1e-5  # the forward does not involve the gradient format
    assert input_gradient > 1e-2 and weight_gradient > 1e-2
