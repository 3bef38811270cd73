"""broadcast_data delivers tensor-parallel rank 0's batch to the other ranks of its group.

Four ranks in two tensor-parallel groups of 2 ({0, 1} and {2, 3}), each group's rank 0
holding a different batch: every rank must receive exactly its own group's tensors
(shapes included), which also checks that the source is the group's first global rank.
"""

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel import broadcast_data
from tests.multirank import run_on_ranks

KEYS = ["tokens", "labels", "scalar"]


def _batch(group_index):
    gen = torch.Generator().manual_seed(group_index)
    return {
        "tokens": torch.randint(0, 100, (2, 5), generator=gen),
        "labels": torch.randint(0, 100, (2, 5, 1), generator=gen),
        "scalar": torch.tensor(7 + group_index),
    }


def _broadcast_on_rank(rank, world):
    groups = parallel_state.initialize_model_parallel(2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    data = _batch(rank // 2) if tp_rank == 0 else None
    return broadcast_data(KEYS, data, torch.int64, groups.tp)


def test_broadcast_data_reaches_every_tensor_parallel_rank():
    results = run_on_ranks(_broadcast_on_rank, 4)
    for rank, received in enumerate(results):
        expected = _batch(rank // 2)
        assert sorted(received) == sorted(KEYS)
        for key in KEYS:
            assert received[key].shape == expected[key].shape, (rank, key)
            assert torch.equal(received[key], expected[key]), (rank, key)


def test_wrong_dtype_is_reported_with_the_key():
    with pytest.raises(ValueError, match="'tokens' has dtype torch.int32"):
        broadcast_data(["tokens"], {"tokens": torch.zeros(2, dtype=torch.int32)}, torch.int64, None)


def test_single_rank_returns_the_data():
    data = _batch(0)
    out = broadcast_data(KEYS, data, torch.int64, None)
    assert all(torch.equal(out[k], data[k]) for k in KEYS)


SHAPES = {"tokens": (2, 5), "labels": (2, 5, 1), "scalar": ()}


def _broadcast_with_shapes_on_rank(rank, world, shapes):
    groups = parallel_state.initialize_model_parallel(2)
    data = _batch(0) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    return broadcast_data(KEYS, data, torch.int64, groups.tp, shapes)


def test_broadcast_with_known_shapes_skips_the_size_exchange():
    for received in run_on_ranks(_broadcast_with_shapes_on_rank, 2, args=(SHAPES,)):
        for key in KEYS:
            assert torch.equal(received[key], _batch(0)[key]), key


def test_known_shapes_that_do_not_match_the_data_are_refused():
    wrong = dict(SHAPES, tokens=(2, 6))
    with pytest.raises(ValueError, match=r"'tokens' has shape \(2, 5\), the other ranks expect \(2, 6\)"):
        broadcast_data(KEYS, _batch(0), torch.int64, None, wrong)
