"""Partition helpers, TP-invariant weight init (with stride), parameter attributes, dtypes.

Single process: ranks are emulated by passing rank/world_size to the CPU initializer, which
is exactly what each real rank computes. Slicing and copying are exact, so comparisons
use torch.equal.
"""

import pytest
import torch

from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabUtility,
    model_parallel_cuda_manual_seed,
    get_cuda_rng_tracker,
    param_is_not_tensor_parallel_duplicate,
    split_tensor_along_last_dim,
    strided_shard,
)
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.transformer_config import init_method_normal


def test_vocab_ranges_are_contiguous_and_cover_the_vocab():
    ranges = [VocabUtility.vocab_range_from_global_vocab_size(32, r, 4) for r in range(4)]
    assert ranges == [(0, 8), (8, 16), (16, 24), (24, 32)]
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        VocabUtility.vocab_range_from_global_vocab_size(30, 0, 4)


def test_split_along_last_dim():
    t = torch.arange(12.0).view(2, 6)
    a, b = split_tensor_along_last_dim(t, 2)
    assert torch.equal(torch.cat([a, b], -1), t) and a.shape == (2, 3)


@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_init_shards_reassemble_to_the_same_full_weight(stride):
    """Shards of every TP size come from one full weight; with stride 2 (fused [gate; up])
    rank r holds block r of the gate half and block r of the up half."""
    init = init_method_normal(1.0)
    torch.manual_seed(3)
    full = torch.empty(8, 3)
    init(full)
    for world in (1, 2, 4):
        shards = []
        for rank in range(world):
            torch.manual_seed(3)
            shard = torch.empty(8 // world, 3)
            master = _initialize_affine_weight_cpu(
                shard, 8, 3, 8 // world, 0, init, stride, True, rank=rank, world_size=world
            )
            assert torch.equal(master, full)
            shards.append(shard)
        if stride == 1:
            assert torch.equal(torch.cat(shards), full)
        else:
            gate, up = full.chunk(2)
            halves = [s.chunk(2) for s in shards]
            assert torch.equal(torch.cat([h[0] for h in halves]), gate)
            assert torch.equal(torch.cat([h[1] for h in halves]), up)
    assert torch.equal(strided_shard(full, 0, 1, 2, 2), torch.cat([full[2:4], full[6:8]]))


def test_parameter_attributes_follow_megatron():
    config = ModelParallelConfig(use_cpu_initialization=True)
    init = init_method_normal(0.02)
    col = ColumnParallelLinear(4, 6, config=config, init_method=init, stride=2)
    row = RowParallelLinear(6, 4, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=True)
    emb = VocabParallelEmbedding(8, 4, init_method=init, config=config)
    assert (col.weight.tensor_model_parallel, col.weight.partition_dim, col.weight.partition_stride) == (True, 0, 2)
    assert (col.bias.tensor_model_parallel, col.bias.partition_dim) == (True, 0)
    assert (row.weight.tensor_model_parallel, row.weight.partition_dim) == (True, 1)
    assert not hasattr(row.bias, "tensor_model_parallel") and row.bias.sequence_parallel is False
    assert (emb.weight.tensor_model_parallel, emb.weight.partition_dim) == (True, 0)
    assert torch.all(col.bias == 0) and torch.all(row.bias == 0)
    assert param_is_not_tensor_parallel_duplicate(row.bias)
    out, bias = row(torch.randn(2, 1, 6))
    assert bias is row.bias and out.shape == (2, 1, 4)
    # state-dict keys as Megatron-Core's local linears (Transformer Engine compatible)
    assert list(col.state_dict()) == ["weight", "bias"]
    col.load_state_dict(col.state_dict())


def test_local_init_draws_from_the_tensor_parallel_stream():
    """Without --use-cpu-initialization the shard is drawn from 'model-parallel-rng'."""
    config = ModelParallelConfig()
    model_parallel_cuda_manual_seed(5, tp_rank=1)
    expected_state = get_cuda_rng_tracker().get_states()["model-parallel-rng"]
    layer = ColumnParallelLinear(4, 6, config=config, init_method=init_method_normal(1.0))
    gen = torch.Generator(device=layer.weight.device.type)
    gen.set_state(expected_state)
    expected = torch.empty(6, 4, device=layer.weight.device).normal_(0.0, 1.0, generator=gen)
    assert torch.equal(layer.weight.detach(), expected)


def test_bf16_params_compute_in_bf16():
    config = ModelParallelConfig(use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(4, 6, config=config, init_method=init_method_normal(1.0))
    torch.manual_seed(0)
    full = torch.empty(6, 4)
    init_method_normal(1.0)(full)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.detach(), full.to(torch.bfloat16))
    out, _ = layer(torch.randn(3, 2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


class _FakeGroup:
    def __init__(self, size):
        self.size = size


def test_invalid_layouts_name_the_flag(monkeypatch):
    from megatron.core.tensor_parallel import layers

    # sizes only: no collective runs while a layer is constructed with use_cpu_initialization
    monkeypatch.setattr(layers, "group_size", lambda group: group.size if isinstance(group, _FakeGroup) else 1)
    monkeypatch.setattr(layers, "group_rank", lambda group: 0)
    config = ModelParallelConfig(use_cpu_initialization=True)
    init = init_method_normal(0.02)
    sp = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="input_is_parallel=True"):
        RowParallelLinear(4, 4, config=sp, init_method=init, bias=False, input_is_parallel=False, skip_bias_add=False)
    with pytest.raises(ValueError, match="gather_output=False"):
        ColumnParallelLinear(4, 4, config=sp, init_method=init, gather_output=True)
    with pytest.raises(ValueError, match="output size 6 is not divisible by 4"):
        ColumnParallelLinear(4, 6, config=config, init_method=init, tp_group=_FakeGroup(4))
    col = ColumnParallelLinear(4, 6, config=config, init_method=init, skip_weight_param_allocation=True)
    with pytest.raises(RuntimeError, match="pass the weight"):
        col(torch.randn(1, 1, 4))
    with pytest.raises(RuntimeError, match=r"expected \(6, 4\)"):
        col(torch.randn(1, 1, 4), weight=torch.randn(4, 6))
    out, _ = col(torch.randn(1, 1, 4), weight=torch.randn(6, 4))
    assert out.shape == (1, 1, 6)
