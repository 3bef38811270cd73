"""Blending: the greedy interleave against Megatron's loop, weights hit, builder sizes,
oversampling, per-split blends and the BlendedDataset cache."""

import math
import os
import shutil

import numpy
import pytest

from megatron.core.datasets import blending_kernel
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blending_indices import build_blending_indices, build_exhaustive_blending_indices
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.split import normalize
from tests.core.datasets.fixtures import TinyTokenizer, random_documents, write_dataset
from tests.core.datasets.reference_megatron import reference_blending, reference_exhaustive_blending


@pytest.mark.parametrize("backend", ["auto", "python"])
@pytest.mark.parametrize("num_datasets", [1, 2, 3, 5, 9])
def test_greedy_interleave_equals_reference(num_datasets, backend):
    rng = numpy.random.RandomState(num_datasets)
    weights = normalize(rng.rand(num_datasets) + 0.01)
    got = build_blending_indices(weights, 3000, backend=backend)
    ref = reference_blending(weights, 3000)
    numpy.testing.assert_array_equal(got[0], ref[0])
    numpy.testing.assert_array_equal(got[1], ref[1])
    assert got[0].dtype == numpy.int16 and got[1].dtype == numpy.int64


def test_weights_are_hit_exactly():
    # With weights 0.2/0.3/0.5 the greedy rule gives exact shares at every multiple of 10.
    choice, sample = build_blending_indices(normalize([2, 3, 5]), 1000)
    numpy.testing.assert_array_equal(numpy.bincount(choice), [200, 300, 500])
    numpy.testing.assert_array_equal(numpy.bincount(choice[:10]), [2, 3, 5])
    weights = normalize([0.137, 0.5, 0.363])
    choice, _ = build_blending_indices(weights, 10007)
    counts = numpy.bincount(choice, minlength=3)
    assert numpy.all(numpy.abs(counts - numpy.array(weights) * 10007) < 1.0)


def test_compiled_loop_loads_where_a_compiler_exists():
    if os.environ.get("MEGATRON_NO_COMPILED_HELPERS") == "1" or not shutil.which("cc"):
        pytest.skip("no C compiler: the Python loop is used")
    assert blending_kernel.load() is not None


@pytest.mark.parametrize("backend", ["auto", "python"])
def test_exhaustive_blending_equals_reference(backend):
    sizes = [7, 0, 31, 12]
    got = build_exhaustive_blending_indices(sizes, backend=backend)
    ref = reference_exhaustive_blending(sizes)
    numpy.testing.assert_array_equal(got[0], ref[0])
    numpy.testing.assert_array_equal(got[1], ref[1])
    numpy.testing.assert_array_equal(numpy.bincount(got[0], minlength=4), sizes)


@pytest.fixture
def prefixes(tmp_path):
    return [write_dataset(str(tmp_path / f"d{i}"), random_documents(120 + 40 * i, seed=10 + i)) for i in range(3)]


def _config(tmp_path, **kw):
    return GPTDatasetConfig(random_seed=7, sequence_length=16, tokenizer=TinyTokenizer(),
                            path_to_cache=str(tmp_path / "cache"), **kw)


def test_weighted_blend_sizes_and_items(tmp_path, prefixes):
    weights = [0.5, 0.3, 0.2]
    blend = ([prefixes[0], prefixes[1], prefixes[2]], weights)
    config = _config(tmp_path, blend=blend, split="90,10,0")
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [100, 20, 0], lambda: True, config).build()
    assert isinstance(train, BlendedDataset) and test is None
    assert len(train) == sum(math.ceil(100 * w) for w in weights)
    for i, w in enumerate(weights):
        assert train.datasets[i].num_samples == math.ceil(math.ceil(100 * w) * 1.005)
    numpy.testing.assert_array_equal(numpy.bincount(train.dataset_index), [50, 30, 20])
    item = train[3]
    inner = train.datasets[item["dataset_id"]][int(train.dataset_sample_index[3])]
    assert set(item) == {"dataset_id"} | set(inner)
    assert (item["tokens"] == inner["tokens"]).all()
    files = os.listdir(tmp_path / "cache")
    base = f"{train.unique_description_hash}-BlendedDataset-train-"
    assert {base + n for n in ("description.txt", "dataset_index.npy", "dataset_sample_index.npy")} <= set(files)
    again = BlendedMegatronDatasetBuilder(GPTDataset, [100, 20, 0], lambda: True, config).build()[0]
    assert not again.built_anew_on_cache_miss
    numpy.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_unweighted_blend_uses_dataset_lengths(tmp_path, prefixes):
    config = _config(tmp_path, blend=(prefixes[:2], None), split="1")
    capped = BlendedMegatronDatasetBuilder(GPTDataset, [50, 0, 0], lambda: True, config).build()[0]
    lengths = [len(d) for d in capped.datasets]
    assert len(capped) == 50 and capped.weights == normalize(lengths)
    whole = BlendedMegatronDatasetBuilder(GPTDataset, [None, 0, 0], lambda: True, config).build()[0]
    assert len(whole) == sum(lengths)
    numpy.testing.assert_array_equal(numpy.bincount(whole.dataset_index), lengths)


def test_per_split_blends(tmp_path, prefixes):
    config = _config(tmp_path, blend_per_split=[([prefixes[0], prefixes[1]], [1.0, 3.0]), ([prefixes[2]], None), None])
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [40, 10, 10], lambda: True, config).build()
    numpy.testing.assert_array_equal(numpy.bincount(train.dataset_index), [10, 30])
    assert isinstance(valid, GPTDataset) and len(valid.indices) == 200 and test is None


def test_oversampling_is_an_error(tmp_path, prefixes):
    config = _config(tmp_path, blend=(prefixes[:2], [0.5, 0.5]), split="1")
    small = [BlendedMegatronDatasetBuilder(GPTDataset, [None, 0, 0], lambda: True,
                                           _config(tmp_path, blend=([p], None), split="1")).build()[0]
             for p in prefixes[:2]]
    with pytest.raises(ValueError, match="--mid-level-dataset-surplus"):
        BlendedDataset(small, [0.5, 0.5], 4 * max(len(d) for d in small), config)


def test_weighted_blend_needs_a_size(tmp_path, prefixes):
    config = _config(tmp_path, blend=(prefixes[:2], [0.5, 0.5]), split="1")
    with pytest.raises(ValueError, match="weights"):
        BlendedMegatronDatasetBuilder(GPTDataset, [None, 0, 0], lambda: True, config)
