"""Split strings, bookends, contiguous element ranges, blend lists and config rules."""

import json

import numpy
import pytest

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    get_blend_from_list,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.training.datasets.blend_args import get_blend_and_blend_per_split
from tests.core.datasets.fixtures import TinyTokenizer, random_documents, write_dataset


def test_parse_and_normalize_split():
    assert parse_and_normalize_split("949,50,1") == [0.949, 0.05, 0.001]
    assert parse_and_normalize_split("969, 30, 1") == [0.969, 0.03, 0.001]
    assert parse_and_normalize_split("99,1") == [0.99, 0.01, 0.0]
    assert parse_and_normalize_split("1") == [1.0, 0.0, 0.0]
    for bad in ("", "1,2,3,4", "0,0,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_and_normalize_split(bad)


def test_split_matrix_bookends():
    assert convert_split_vector_to_split_matrix([0.9, 0.09, 0.01]) == [(0, 0.9), (0.9, 0.99), (0.99, 1.0)]
    assert convert_split_vector_to_split_matrix([1.0, 0.0, 0.0]) == [(0, 1.0), None, None]
    assert convert_split_vector_to_split_matrix([0.5, 0.0, 0.5]) == [(0, 0.5), None, (0.5, 1.0)]


def test_blend_lists():
    assert get_blend_from_list(["a"]) == (["a"], None)
    assert get_blend_from_list(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert get_blend_from_list(["a", "b"]) == (["a", "b"], None)
    assert get_blend_from_list(["a", "b", "c"]) == (["a", "b", "c"], None)
    assert get_blend_from_list(None) is None


def test_splits_are_contiguous_ranges(tmp_path):
    prefix = write_dataset(str(tmp_path / "d"), random_documents(200, seed=1))
    config = GPTDatasetConfig(random_seed=5, sequence_length=8, blend=([prefix], None), split="90,7,3",
                              path_to_cache=str(tmp_path / "c"), tokenizer=TinyTokenizer())
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
    numpy.testing.assert_array_equal(train.indices, numpy.arange(0, 180))
    numpy.testing.assert_array_equal(valid.indices, numpy.arange(180, 194))
    numpy.testing.assert_array_equal(test.indices, numpy.arange(194, 200))
    assert set(numpy.unique(valid.document_index)) == set(range(180, 194))


def test_empty_eval_split_is_skipped_but_empty_train_fails(tmp_path):
    prefix = write_dataset(str(tmp_path / "d"), random_documents(100, seed=2))
    config = GPTDatasetConfig(random_seed=5, sequence_length=8, blend=([prefix], None), split="969,30,1",
                              path_to_cache=str(tmp_path / "c"), tokenizer=TinyTokenizer())
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [10, 5, 5], lambda: True, config).build()
    assert len(train) >= 10 and len(valid.indices) == 3 and test is None
    config = GPTDatasetConfig(random_seed=5, sequence_length=8, blend=([prefix], None), split="0,1,0",
                              path_to_cache=str(tmp_path / "c"), tokenizer=TinyTokenizer())
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [10, 5, 0], lambda: True, config).build()
    assert train is None and len(valid.indices) == 100


def test_config_rules():
    mock = GPTDatasetConfig(random_seed=1, sequence_length=8, tokenizer=TinyTokenizer())
    assert mock.mock and mock.split == "1,1,1"
    with pytest.raises(ValueError, match="--split"):
        GPTDatasetConfig(random_seed=1, sequence_length=8, blend=(["p"], None), tokenizer=TinyTokenizer())
    with pytest.raises(ValueError, match="weight"):
        GPTDatasetConfig(random_seed=1, sequence_length=8, blend=(["p", "q"], [1.0]), split="1",
                         tokenizer=TinyTokenizer())
    with pytest.raises(ValueError, match="--split"):
        GPTDatasetConfig(random_seed=1, sequence_length=8, blend_per_split=[(["p"], None), None, None],
                         split="1", tokenizer=TinyTokenizer())


class _Args:
    def __init__(self, **kw):
        self.data_path = self.data_args_path = self.per_split_data_args_path = None
        self.train_data_path = self.valid_data_path = self.test_data_path = None
        self.__dict__.update(kw)


def test_blend_from_args(tmp_path):
    assert get_blend_and_blend_per_split(_Args(data_path=["0.2", "a", "0.8", "b"])) == ((["a", "b"], [0.2, 0.8]), None)
    args_file = tmp_path / "blend.txt"
    args_file.write_text("0.5 x\n0.5 y\n")
    assert get_blend_and_blend_per_split(_Args(data_args_path=str(args_file))) == ((["x", "y"], [0.5, 0.5]), None)
    per_split = tmp_path / "per_split.json"
    per_split.write_text(json.dumps({"train": "1 t1 3 t2", "valid": ["v"]}))
    blend, per = get_blend_and_blend_per_split(_Args(per_split_data_args_path=str(per_split)))
    assert blend is None and per == [(["t1", "t2"], [1.0, 3.0]), (["v"], None), None]
    assert get_blend_and_blend_per_split(_Args(train_data_path=["t"], test_data_path=["s"])) == (
        None, [(["t"], None), None, (["s"], None)])
    with pytest.raises(ValueError, match="--per-split-data-args-path"):
        get_blend_and_blend_per_split(_Args(per_split_data_args_path=str(tmp_path / "missing.json")))
