"""The FP8 copies of a weight are reused between micro-batches under ``tensorwise`` and
rebuilt after any change to the weight: an in-place write (version counter) or an
optimizer step (``weights_updated``); the fused quantize-with-transpose equals eager."""

import torch

from megatron.core.fp8.gemm import EMULATION
from megatron.core.fp8.linear import fp8_linear
from megatron.core.fp8.recipe import Fp8Recipe
from megatron.core.fp8.scaling import Fp8Scaling, quantize, quantize_with_transpose
from megatron.core.fp8.weight_cache import weights_updated


def _setup(recipe="tensorwise"):
    torch.manual_seed(0)
    scaling = Fp8Scaling(Fp8Recipe(recipe=recipe, emulation=True))
    weight = torch.nn.Parameter(torch.randn(24, 16) * 0.05)
    return scaling, weight


def _forward(scaling, weight, seed=1):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    y = fp8_linear(x, weight, scaling, backend=EMULATION)
    y.sum().backward()
    return y.detach()


def _uncached(weight, seed=1):
    fresh = Fp8Scaling(Fp8Recipe(recipe="tensorwise", emulation=True))
    return _forward(fresh, weight.detach().clone().requires_grad_(), seed)


def test_tensorwise_reuses_the_weight_copies_until_the_weight_changes():
    scaling, weight = _setup()
    _forward(scaling, weight)
    first = scaling.weight_cache._entry
    _forward(scaling, weight, seed=2)
    assert scaling.weight_cache._entry is first  # second micro-batch: no new quantization
    with torch.no_grad():
        weight.mul_(1.5)  # an in-place write bumps the version counter
    assert torch.equal(_forward(scaling, weight, seed=3), _uncached(weight, seed=3))
    assert scaling.weight_cache._entry is not first


def test_an_optimizer_step_invalidates_the_cache():
    scaling, weight = _setup()
    _forward(scaling, weight)
    first = scaling.weight_cache._entry
    weights_updated()
    _forward(scaling, weight)
    assert scaling.weight_cache._entry is not first


def test_delayed_recipe_requantizes_every_call():
    scaling, weight = _setup("delayed")
    _forward(scaling, weight)
    assert scaling.weight_cache._entry is None


def test_quantize_with_transpose_gives_the_transposed_copy():
    x = torch.randn(40, 24) * 3
    scale = torch.tensor(448.0) / x.abs().amax()
    q, q_t = quantize_with_transpose(x, scale, torch.float8_e4m3fn)
    eager = quantize(x, scale, torch.float8_e4m3fn)
    assert q.view(torch.uint8).equal(eager.view(torch.uint8))
    assert q_t.is_contiguous() and q_t.view(torch.uint8).equal(eager.t().contiguous().view(torch.uint8))
