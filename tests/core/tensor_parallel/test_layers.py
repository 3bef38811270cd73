"""Tensor-parallel layers on TP = 2 and 4 equal one process on the same full weights.

Each rank builds the layer with --use-cpu-initialization from the same seed, so the full
weight equals the one the parent draws for its plain-torch reference. Outputs and the
gradients of inputs, weights (shards reassembled) and biases are compared.

Tolerance: fp32, unit-normal weights and inputs, so outputs and gradients reach ~15 in
magnitude (sums of K = 16 products). The parallel layers only reorder additions (a
row-parallel dot product becomes tp partial sums plus an all-reduce; gradients are summed
across ranks), which moves a result by a few ulps of the sum's magnitude: ulp(16) is
1.9e-6 and the measured worst case is 3e-6. ATOL = 1e-5 (a few ulps) and RTOL = 1e-6 cover
that; a wrong shard, a missing reduction or a doubled bias is off by O(1).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.transformer_config import init_method_normal
from tests.multirank import run_on_ranks

RTOL, ATOL = 1e-6, 1e-5
S, B, IN, OUT, VOCAB = 8, 2, 16, 24, 32
SEED = 1234


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _full_weight(seed, rows, cols):
    """The weight a layer built after torch.manual_seed(seed) holds in full."""
    torch.manual_seed(seed)
    weight = torch.empty(rows, cols)
    init_method_normal(1.0)(weight)
    return weight


def _chunk(tensor, dim, rank, world):
    return tensor.chunk(world, dim=dim)[rank]


def _column(rank, world, group, config, gather_output):
    torch.manual_seed(SEED)
    layer = ColumnParallelLinear(
        IN, OUT, config=config, init_method=init_method_normal(1.0), gather_output=gather_output, tp_group=group
    )
    with torch.no_grad():
        layer.bias.copy_(_chunk(_randn(1, OUT), 0, rank, world))
    x = _randn(2, S, B, IN).requires_grad_()
    grad_out = _randn(3, S, B, OUT)
    y, bias = layer(x)
    assert bias is None
    (y * (grad_out if gather_output else _chunk(grad_out, -1, rank, world))).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dw=layer.weight.grad, db=layer.bias.grad)


def _row(rank, world, group, config, input_is_parallel):
    torch.manual_seed(SEED)
    layer = RowParallelLinear(
        IN, OUT, config=config, init_method=init_method_normal(1.0), bias=True,
        input_is_parallel=input_is_parallel, skip_bias_add=False, tp_group=group,
    )
    with torch.no_grad():
        layer.bias.copy_(_randn(1, OUT))
    x_full = _randn(2, S, B, IN)
    x = (_chunk(x_full, -1, rank, world).clone() if input_is_parallel else x_full).requires_grad_()
    y, bias = layer(x)
    assert bias is None
    (y * _randn(3, S, B, OUT)).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dw=layer.weight.grad, db=layer.bias.grad)


def _embedding(rank, world, group, config, reduce_scatter=False):
    torch.manual_seed(SEED)
    layer = VocabParallelEmbedding(
        VOCAB, IN, init_method=init_method_normal(1.0), config=config, tp_group=group,
        reduce_scatter_embeddings=reduce_scatter,
    )
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(4))
    y = layer(ids)
    grad = _randn(5, B, S, IN)
    if reduce_scatter:  # output is this rank's sequence block, [s/tp, b, h]
        grad = _chunk(grad.transpose(0, 1), 0, rank, world)
    (y * grad).sum().backward()
    return dict(y=y.detach(), dw=layer.weight.grad)


def _layers_on_rank(rank, world, break_row_reduction=False):
    groups = parallel_state.initialize_model_parallel(world)
    if break_row_reduction:
        # a deliberately wrong layer: partial products are never summed over ranks
        from megatron.core.tensor_parallel import layers

        layers.reduce_from_tensor_model_parallel_region = lambda tensor, group: tensor
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    out = {"row_parallel_in": _row(rank, world, groups.tp, config, True)}
    if break_row_reduction:
        return out
    out["row_full_in"] = _row(rank, world, groups.tp, config, False)
    out["column"] = _column(rank, world, groups.tp, config, False)
    out["column_gather"] = _column(rank, world, groups.tp, config, True)
    out["embedding"] = _embedding(rank, world, groups.tp, config)
    out["embedding_rs"] = _embedding(rank, world, groups.tp, config, reduce_scatter=True)
    return out


def _reference_linear():
    weight = _full_weight(SEED, OUT, IN).requires_grad_()
    bias = _randn(1, OUT).requires_grad_()
    x = _randn(2, S, B, IN).requires_grad_()
    y = F.linear(x, weight, bias)
    (y * _randn(3, S, B, OUT)).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dw=weight.grad, db=bias.grad)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def check_column(results, key):
    ref, world = _reference_linear(), len(results)
    gathered = key == "column_gather"
    for rank, res in enumerate(results):
        r = res[key]
        _close(r["y"], ref["y"] if gathered else _chunk(ref["y"], -1, rank, world), f"{key} output rank {rank}")
        _close(r["dx"], ref["dx"], f"{key} input grad rank {rank}")
    _close(torch.cat([res[key]["dw"] for res in results], 0), ref["dw"], f"{key} weight grad")
    _close(torch.cat([res[key]["db"] for res in results], 0), ref["db"], f"{key} bias grad")


def check_row(results, key):
    ref = _reference_linear()
    for rank, res in enumerate(results):
        r = res[key]
        _close(r["y"], ref["y"], f"{key} output rank {rank}")
        _close(r["db"], ref["db"], f"{key} bias grad rank {rank}")
        if key == "row_full_in":
            _close(r["dx"], ref["dx"], f"{key} input grad rank {rank}")
    if key == "row_parallel_in":
        _close(torch.cat([res[key]["dx"] for res in results], -1), ref["dx"], f"{key} input grad")
    _close(torch.cat([res[key]["dw"] for res in results], 1), ref["dw"], f"{key} weight grad")


def check_embedding(results, key="embedding"):
    weight = _full_weight(SEED, VOCAB, IN).requires_grad_()
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(4))
    y = F.embedding(ids, weight)
    (y * _randn(5, B, S, IN)).sum().backward()
    if key == "embedding_rs":
        _close(torch.cat([res[key]["y"] for res in results], 0), y.detach().transpose(0, 1), f"{key} output")
    else:
        for rank, res in enumerate(results):
            _close(res[key]["y"], y.detach(), f"{key} output rank {rank}")
    _close(torch.cat([res[key]["dw"] for res in results], 0), weight.grad, f"{key} weight grad")


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    return run_on_ranks(_layers_on_rank, request.param)


@pytest.mark.parametrize("key", ["column", "column_gather"])
def test_column_parallel_linear_matches_serial(tp_results, key):
    check_column(tp_results, key)


@pytest.mark.parametrize("key", ["row_parallel_in", "row_full_in"])
def test_row_parallel_linear_matches_serial(tp_results, key):
    check_row(tp_results, key)


@pytest.mark.parametrize("key", ["embedding", "embedding_rs"])
def test_vocab_parallel_embedding_matches_serial(tp_results, key):
    """Plain (all-reduce) and reduce_scatter_embeddings ([s/tp, b, h] for sequence parallel)."""
    check_embedding(tp_results, key)


def test_single_process_layers_match_serial():
    """TP = 1 (no process group): the layers are plain linears/embedding."""
    config = ModelParallelConfig(use_cpu_initialization=True)
    check_column([{"column": _column(0, 1, None, config, False)}], "column")
    check_row([{"row_full_in": _row(0, 1, None, config, False)}], "row_full_in")
    check_embedding([{"embedding": _embedding(0, 1, None, config)}])
    check_embedding([{"embedding_rs": _embedding(0, 1, None, config, reduce_scatter=True)}], "embedding_rs")


def test_parity_check_catches_a_missing_reduction():
    """With RowParallelLinear's all-reduce replaced by identity, the parity check fails."""
    results = run_on_ranks(_layers_on_rank, 2, kwargs={"break_row_reduction": True})
    with pytest.raises(AssertionError, match="row_parallel_in output"):
        check_row(results, "row_parallel_in")
