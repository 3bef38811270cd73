"""The builder on several ranks: rank 0 writes the caches first, the other building ranks
load them, ranks that do not build get None."""

import numpy

from tests.core.datasets.fixtures import TinyTokenizer, random_documents, write_dataset
from tests.multirank import run_on_ranks


def _build_on_ranks(rank, world_size, prefix, other, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=9, sequence_length=8, blend=([prefix, other], [0.4, 0.6]),
                              split="80,20,0", path_to_cache=cache, tokenizer=TinyTokenizer())
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [30, 10, 0], lambda: True, config).build()
    # Again, with rank 1 playing a tensor-parallel rank that reads no data.
    again = BlendedMegatronDatasetBuilder(GPTDataset, [30, 10, 0], lambda: rank == 0, config).build()
    return {
        "anew": [train.built_anew_on_cache_miss] + [d.built_anew_on_cache_miss for d in train.datasets + valid.datasets],
        "dataset_index": numpy.asarray(train.dataset_index).copy(),
        "tokens": train[5]["tokens"],
        "again": [None if d is None else d.built_anew_on_cache_miss for d in again],
    }


def test_rank_zero_builds_others_load(tmp_path):
    prefix = write_dataset(str(tmp_path / "a"), random_documents(80, seed=1))
    other = write_dataset(str(tmp_path / "b"), random_documents(90, seed=2))
    results = run_on_ranks(_build_on_ranks, 2, args=(prefix, other, str(tmp_path / "cache")))
    assert all(results[0]["anew"]) and not any(results[1]["anew"])
    numpy.testing.assert_array_equal(results[0]["dataset_index"], results[1]["dataset_index"])
    assert (results[0]["tokens"] == results[1]["tokens"]).all()
    assert results[0]["again"] == [False, False, None] and results[1]["again"] == [None, None, None]
