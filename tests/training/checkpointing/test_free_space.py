"""The free-space check before a save: data-parallel replicas count once, and a save
that cannot fit is refused up front with the bytes needed and free."""

import pytest
import torch

from megatron.core.dist_checkpointing import ShardedTensor
from megatron.training.checkpointing import CheckpointError
from megatron.training.checkpointing.free_space import OVERHEAD_BYTES, bytes_needed, check_free_space


def _chunk(key, offset, numel):
    return ShardedTensor(key, torch.zeros(numel), (2 * numel,), (offset,))


def test_bytes_needed_counts_each_chunk_once():
    chunks = [_chunk("a", 0, 1000), _chunk("a", 1000, 1000), _chunk("a", 0, 1000)]  # the last is a replica
    assert OVERHEAD_BYTES + 8000 <= bytes_needed(chunks, group=None) < OVERHEAD_BYTES + 8400


def test_a_save_that_cannot_fit_is_refused_naming_the_sizes():
    with pytest.raises(CheckpointError, match=r"iteration 8 to /ckpt was refused before writing: it needs about "
                                              r"2\.00 MiB and the file system has 1\.00 MiB free\. The previous "
                                              r"checkpoint \(iteration 6\) is untouched"):
        check_free_space("/ckpt", 8, 2 * 2**20, 2**20, 6)
    check_free_space("/ckpt", 8, 2**20, 2 * 2**20, 6)
    check_free_space("/ckpt", 8, 2**20, None, 6)  # unknown free space: no refusal
