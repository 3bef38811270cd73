"""Each mapping's forward and backward on 2 ranks equal its documented collective pair.

Every rank feeds its own input x_r and its own output gradient g_r; the parent recomputes
the expected forward output and input gradient from all ranks' x and g with plain torch
(the documented pair, e.g. copy_to: y_r = x_r, dx_r = sum_q g_q). The backward is taken by
autograd through the mapping. The check runs twice: through the gloo fallbacks and through
the single-tensor native collectives (which this gloo build also provides), so both code
paths of collectives.py are covered. Sums over 2 ranks are a single fp32 addition, which
is commutative, so results are exact up to 1 ulp: RTOL 1e-6, ATOL 1e-7.
"""

import pytest
import torch

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import collectives
from tests.multirank import run_on_ranks

WORLD = 2
SHAPE = (4, 3, 6)  # [s, b, h], s and h divisible by WORLD

MAPPINGS = {
    "copy_to": tensor_parallel.copy_to_tensor_model_parallel_region,
    "reduce_from": tensor_parallel.reduce_from_tensor_model_parallel_region,
    "scatter_to_tp": tensor_parallel.scatter_to_tensor_model_parallel_region,
    "gather_from_tp": tensor_parallel.gather_from_tensor_model_parallel_region,
    "scatter_to_sp": tensor_parallel.scatter_to_sequence_parallel_region,
    "gather_from_sp": tensor_parallel.gather_from_sequence_parallel_region,
    "gather_from_sp_no_tp_grad": lambda x, group: tensor_parallel.gather_from_sequence_parallel_region(
        x, group, tensor_parallel_output_grad=False
    ),
    "reduce_scatter_to_sp": tensor_parallel.reduce_scatter_to_sequence_parallel_region,
}


def _input(name, rank):
    """The per-rank input; gathers take a shard-shaped input."""
    shape = list(SHAPE)
    if name == "gather_from_tp":
        shape[-1] //= WORLD
    if name.startswith("gather_from_sp"):
        shape[0] //= WORLD
    return torch.randn(*shape, generator=torch.Generator().manual_seed(10 * rank + len(name)))


def _output_grad(name, rank, like):
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(1000 + 10 * rank + len(name)))


def _run_all(rank):
    group = torch.distributed.group.WORLD
    out = {}
    for name, fn in MAPPINGS.items():
        x = _input(name, rank).requires_grad_()
        y = fn(x, group)
        g = _output_grad(name, rank, y)
        y.backward(g)
        out[name] = dict(x=x.detach(), y=y.detach(), g=g, dx=x.grad)
    return out


def _mappings_on_rank(rank, world):
    results = {"fallback": _run_all(rank)}
    collectives.native_single_tensor_collectives = lambda group: True
    results["native"] = _run_all(rank)
    return results


def _expected(name, xs, gs, rank):
    """(y_rank, dx_rank) from the documented forward/backward pair."""
    split = lambda t, dim: t.chunk(WORLD, dim=dim)[rank]
    if name == "copy_to":
        return xs[rank], sum(gs)
    if name == "reduce_from":
        return sum(xs), gs[rank]
    if name == "scatter_to_tp":
        return split(xs[rank], -1), torch.cat(gs, -1)
    if name == "gather_from_tp":
        return torch.cat(xs, -1), split(gs[rank], -1)
    if name == "scatter_to_sp":
        return split(xs[rank], 0), torch.cat(gs, 0)
    if name == "gather_from_sp":
        return torch.cat(xs, 0), split(sum(gs), 0)
    if name == "gather_from_sp_no_tp_grad":
        return torch.cat(xs, 0), split(gs[rank], 0)
    if name == "reduce_scatter_to_sp":
        return split(sum(xs), 0), torch.cat(gs, 0)
    raise KeyError(name)


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_mappings_on_rank, WORLD)


@pytest.mark.parametrize("path", ["fallback", "native"])
@pytest.mark.parametrize("name", list(MAPPINGS))
def test_mapping_forward_and_backward(results, path, name):
    xs = [r[path][name]["x"] for r in results]
    gs = [r[path][name]["g"] for r in results]
    for rank, res in enumerate(results):
        y, dx = _expected(name, xs, gs, rank)
        torch.testing.assert_close(res[path][name]["y"], y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res[path][name]["dx"], dx, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_mapping_is_identity_without_a_group(name):
    x = _input(name, 0).requires_grad_()
    y = MAPPINGS[name](x, None)
    assert y is x


def test_uneven_sequence_split_names_the_fix():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        tensor_parallel.split_tensor_along_first_dim(torch.zeros(5, 2), 2, 0)
