"""Index cache files carry their size and CRC-32 (checksums.json, written before the
description): a rewritten index of the right dtype and shape, or a shortened one, is an
error naming the file and saying to delete it; a cache without checksums (Megatron-LM's)
loads unchecked."""

import os

import numpy
import pytest

from megatron.core.datasets.index_cache import CHECKSUMS, IndexCache


@pytest.fixture
def cache(tmp_path):
    cache = IndexCache(str(tmp_path), "abc-GPTDataset-train", ["document_index", "shuffle_index"])
    cache.save("{}", {"document_index": numpy.arange(10, dtype=numpy.int32),
                      "shuffle_index": numpy.arange(6, dtype=numpy.uint32)})
    return cache


def test_checksums_are_written_before_the_description(cache):
    assert os.path.isfile(cache.path(CHECKSUMS))
    assert cache.load()["shuffle_index"].tolist() == list(range(6))


def test_a_rewritten_shuffle_index_is_refused_naming_the_file(cache):
    path = cache.paths()["shuffle_index"]
    numpy.save(path, numpy.arange(6, dtype=numpy.uint32)[::-1].copy(), allow_pickle=False)  # same size, other order
    with pytest.raises(ValueError, match=f"index cache file {path} does not have the content.*delete it"):
        cache.load()


def test_a_shorter_index_is_refused_naming_the_file(cache):
    path = cache.paths()["document_index"]
    numpy.save(path, numpy.arange(9, dtype=numpy.int32), allow_pickle=False)
    with pytest.raises(ValueError, match=f"index cache file {path} is \\d+ bytes, \\d+ were written"):
        cache.load()


def test_a_cache_without_checksums_loads(cache):
    os.remove(cache.path(CHECKSUMS))
    assert cache.load()["document_index"].tolist() == list(range(10))


def test_damaged_checksum_file_is_named(cache):
    with open(cache.path(CHECKSUMS), "w") as handle:
        handle.write("{not json")
    with pytest.raises(ValueError, match=f"{CHECKSUMS} cannot be read"):
        cache.load()
