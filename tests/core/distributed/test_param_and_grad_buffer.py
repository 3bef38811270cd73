"""Buffer layout: bucket boundaries, distributed-optimizer padding, owned ranges, bucket size.

Pure arithmetic on ``compute_buffer_layout`` and ``owned_param_ranges`` (no ranks), plus
one single-process buffer to check that params and grads become views of the buffers.
"""

import math

import pytest
import torch

from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.distributed_data_parallel import default_bucket_size
from megatron.core.distributed.param_and_grad_buffer import (
    GRAD_START_ALIGNMENT,
    PARAM_ALIGNMENT,
    ParamAndGradBuffer,
    bucket_pad_multiple,
    compute_buffer_layout,
)
from megatron.core.optimizer.distrib_optimizer import owned_param_ranges


def test_plain_ddp_layout_is_contiguous_and_unpadded():
    layout = compute_buffer_layout([8, 24, 8, 48], bucket_size=None, dp_size=4, use_distributed_optimizer=False)
    assert layout.param_ranges == ((0, 8), (8, 32), (32, 40), (40, 88))
    assert layout.bucket_ranges == ((0, 88),)
    assert layout.numel == layout.numel_unpadded == 88


def test_plain_ddp_layout_keeps_every_param_start_aligned():
    # An odd-sized param (an output-layer bias over a 30522-token vocabulary) must not leave
    # the following main_grad slices misaligned for the GEMMs that accumulate into them.
    layout = compute_buffer_layout([30522, 1024 * 1024, 3, 5], bucket_size=None, dp_size=1,
                                   use_distributed_optimizer=False)
    assert [start % GRAD_START_ALIGNMENT for start, _ in layout.param_ranges] == [0, 0, 0, 0]
    assert layout.param_ranges[1] == (30528, 30528 + 1024 * 1024)
    assert layout.numel_unpadded == 30522 + 1024 * 1024 + 8


def test_bucket_closes_once_it_reaches_the_size():
    # Megatron's rule: add the param, then close the bucket if it holds >= bucket_size.
    layout = compute_buffer_layout([8, 16, 8, 48, 5], bucket_size=30, dp_size=1, use_distributed_optimizer=False)
    assert layout.bucket_ranges == ((0, 32), (32, 80), (80, 88))
    assert layout.bucket_of_param == (0, 0, 0, 1, 2)
    # A param is never split, even when larger than the bucket size.
    layout = compute_buffer_layout([96, 1], bucket_size=10, dp_size=1, use_distributed_optimizer=False)
    assert layout.bucket_ranges == ((0, 96), (96, 104))


def test_tied_embedding_gets_its_own_bucket():
    layout = compute_buffer_layout([10, 20, 30, 40], None, 2, True, own_bucket=[False, True, False, False])
    assert layout.bucket_of_param == (0, 1, 2, 2)
    assert layout.bucket_ranges == ((0, 128), (128, 256), (256, 384))  # 30 at 256, 40 at 320
    layout = compute_buffer_layout([20, 30], None, 2, True, own_bucket=[True, False])
    assert layout.bucket_of_param == (0, 1)


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 6])
def test_distributed_optimizer_padding(dp):
    numels = [3, 200, 70, 1000, 1]
    layout = compute_buffer_layout(numels, bucket_size=250, dp_size=dp, use_distributed_optimizer=True)
    multiple = math.lcm(dp, 128)
    for (start, end), numel in zip(layout.param_ranges, numels):
        assert start % PARAM_ALIGNMENT == 0 and end - start == numel
    previous_end = 0
    for (start, end), unpadded in zip(layout.bucket_ranges, layout.bucket_numel_unpadded):
        assert start == previous_end and start % multiple == 0 and end % multiple == 0
        assert 0 <= end - (start + unpadded) < multiple  # pad only up to the next multiple
        previous_end = end
    # Buckets: [3, 200] (reaches 250 with the alignment gap), [70, 1000], [1].
    assert layout.bucket_of_param == (0, 0, 1, 1, 2)
    assert layout.numel_unpadded == sum(numels)


def test_padding_for_high_nccl_bus_bandwidth():
    assert bucket_pad_multiple(4) == 128
    assert bucket_pad_multiple(3) == 384
    assert bucket_pad_multiple(4, pad_buckets_for_high_nccl_busbw=True) == 2**16
    layout = compute_buffer_layout([10], None, 3, True, pad_buckets_for_high_nccl_busbw=True)
    assert layout.numel == 3 * 2**16


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_owned_ranges_partition_every_param(dp):
    numels = [5, 130, 64, 7, 300, 1]
    layout = compute_buffer_layout(numels, bucket_size=150, dp_size=dp, use_distributed_optimizer=True)
    covered = [torch.zeros(n, dtype=torch.int64) for n in numels]
    for rank in range(dp):
        for i, piece in enumerate(owned_param_ranges(layout, dp, rank)):
            if piece is None:
                continue
            bucket_start, bucket_end = layout.bucket_ranges[piece.bucket_id]
            shard = (bucket_end - bucket_start) // dp
            block_start = bucket_start + rank * shard
            assert block_start <= piece.local[0] < piece.local[1] <= block_start + shard
            assert piece.shard == (piece.local[0] - block_start, piece.local[1] - block_start)
            assert piece.param == (piece.local[0] - piece.world[0], piece.local[1] - piece.world[0])
            covered[i][piece.param[0]:piece.param[1]] += 1
    for c in covered:
        assert torch.equal(c, torch.ones_like(c)), "every element owned by exactly one rank"


def test_default_bucket_size_follows_megatron():
    assert default_bucket_size(DistributedDataParallelConfig(), 8) is None
    assert default_bucket_size(DistributedDataParallelConfig(bucket_size=1000), 8) is None
    assert default_bucket_size(DistributedDataParallelConfig(overlap_grad_reduce=True), 8) == 40_000_000
    assert default_bucket_size(DistributedDataParallelConfig(overlap_grad_reduce=True), 64) == 64_000_000
    assert default_bucket_size(DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=99), 8) == 99


def test_config_rejections_name_the_flags():
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        DistributedDataParallelConfig(overlap_param_gather=True, overlap_grad_reduce=True)
    with pytest.raises(ValueError, match="--overlap-param-gather needs --overlap-grad-reduce"):
        DistributedDataParallelConfig(overlap_param_gather=True, use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="--ddp-bucket-size"):
        DistributedDataParallelConfig(bucket_size=0)


def test_params_and_grads_become_views_of_the_buffers():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    values = [p.detach().clone() for p in params]
    buffer = ParamAndGradBuffer(params, torch.float32, None, 1.0, use_distributed_optimizer=True)
    # Reverse order: the 7-vector first at 0, the 3x5 matrix at the next multiple of 64.
    assert buffer.param_index_map[params[1]] == (0, 7, 0)
    assert buffer.param_index_map[params[0]] == (64, 79, 0)
    assert buffer.numel == 128
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
        assert p.untyped_storage().data_ptr() == buffer.param_data.untyped_storage().data_ptr()
        assert p.main_grad.untyped_storage().data_ptr() == buffer.grad_data.untyped_storage().data_ptr()
    assert float(buffer.param_data[7:64].abs().sum()) == 0.0  # padding stays zero
