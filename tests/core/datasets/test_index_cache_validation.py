"""Index cache files are loaded as plain integer arrays: a pickled file (which could run
code when loaded), a truncated one or one of another dtype is refused, naming the file."""

import os

import numpy
import pytest

from megatron.core.datasets.index_cache import IndexCache


@pytest.fixture
def cache(tmp_path):
    cache = IndexCache(str(tmp_path), "abc-GPTDataset-train", ["document_index", "shuffle_index"])
    cache.save("{}", {"document_index": numpy.arange(10, dtype=numpy.int32),
                      "shuffle_index": numpy.arange(5, dtype=numpy.uint32)})
    return cache


def test_a_written_cache_loads(cache):
    loaded = cache.load()
    assert loaded["document_index"].tolist() == list(range(10))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_index_file_is_refused_without_unpickling(cache):
    path = cache.paths()["shuffle_index"]
    numpy.save(path, numpy.array([_RunsCode()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"index cache file {path} cannot be read"):
        cache.load()


def test_a_truncated_or_float_index_file_is_refused_naming_it(cache):
    path = cache.paths()["document_index"]
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 12)
    with pytest.raises(ValueError, match=f"index cache file {path}"):
        cache.load()
    numpy.save(path, numpy.zeros(3, dtype=numpy.float32))
    with pytest.raises(ValueError, match="holds float32 values"):
        cache.load()
