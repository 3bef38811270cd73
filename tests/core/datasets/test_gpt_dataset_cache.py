"""Cache files: Megatron's names and description bytes, reuse, and rebuild of a partial cache."""

import hashlib
import os

import numpy
import pytest

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from tests.core.datasets.fixtures import TinyTokenizer, random_documents, write_dataset

# What Megatron writes for this configuration: json.dumps(indent=4) of an ordered dict;
# the first bookend is the int 0 and 0.969 + 0.03 is 0.999 in float64.
EXPECTED_DESCRIPTION = """{
    "class": "GPTDataset",
    "dataset_path": "%s",
    "num_samples": 40,
    "index_split": "train",
    "random_seed": 1234,
    "sequence_length": 16,
    "split": "969, 30, 1",
    "split_matrix": [
        [
            0,
            0.969
        ],
        [
            0.969,
            0.999
        ],
        [
            0.999,
            1.0
        ]
    ],
    "tokenizer": {
        "class": "TinyTokenizer",
        "tokenizer_path": [],
        "eod": "0"
    }
}"""


@pytest.fixture
def prefix(tmp_path):
    return write_dataset(str(tmp_path / "corpus_text_document"), random_documents(300, seed=3))


def _train(prefix, cache, num_samples=40):
    config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend=([prefix], None), split="969, 30, 1",
                              path_to_cache=cache, tokenizer=TinyTokenizer())
    return BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()[0]


def test_names_and_description_bytes(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    ds = _train(prefix, cache)
    description = EXPECTED_DESCRIPTION % prefix
    md5 = hashlib.md5(description.encode("utf-8")).hexdigest()
    base = f"{md5}-GPTDataset-train-"
    assert sorted(f for f in os.listdir(cache) if f.startswith(md5)) == sorted(
        # Megatron's four files, plus our checksums of the index files
        base + s for s in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy",
                           "checksums.json")
    )
    with open(os.path.join(cache, base + "description.txt"), "rb") as f:
        assert f.read() == description.encode("utf-8")
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    saved = numpy.load(os.path.join(cache, base + "sample_index.npy"))
    numpy.testing.assert_array_equal(saved, ds.sample_index)


def test_default_cache_directory_is_under_the_prefix(prefix):
    ds = _train(prefix, None)
    folder = os.path.join(prefix, "cache", "GPTDataset_indices")
    assert os.path.isfile(os.path.join(folder, f"{ds.unique_description_hash}-GPTDataset-train-description.txt"))


def test_second_build_loads_the_cache(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    first = _train(prefix, cache)
    assert first.built_anew_on_cache_miss
    second = _train(prefix, cache)
    assert not second.built_anew_on_cache_miss
    assert isinstance(second.shuffle_index, numpy.memmap) and not second.shuffle_index.flags.writeable
    for a, b in zip((first.document_index, first.sample_index, first.shuffle_index),
                    (second.document_index, second.sample_index, second.shuffle_index)):
        numpy.testing.assert_array_equal(a, b)
    for i in (0, 7, len(first) - 1):
        assert all((first[i][k] == second[i][k]).all() for k in first[i])


def test_different_request_gets_its_own_cache(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    a, b = _train(prefix, cache, 40), _train(prefix, cache, 41)
    assert a.unique_description_hash != b.unique_description_hash and b.built_anew_on_cache_miss


@pytest.mark.parametrize("missing", ["description.txt", "shuffle_index.npy"])
def test_partial_cache_is_rebuilt(prefix, tmp_path, missing):
    cache = str(tmp_path / "cache")
    first = _train(prefix, cache)
    path = os.path.join(cache, f"{first.unique_description_hash}-GPTDataset-train-{missing}")
    os.remove(path)
    # A leftover temporary file of a crashed write must not count as the real one.
    open(path + ".123.tmp", "wb").close()
    again = _train(prefix, cache)
    assert again.built_anew_on_cache_miss and os.path.isfile(path)
    numpy.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    assert not _train(prefix, cache).built_anew_on_cache_miss
