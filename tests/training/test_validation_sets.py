"""--full-validation and --multiple-validation-sets: what each evaluation reads, the labels,
the builder's per-prefix validation datasets, and the errors for combinations that do not work."""

import argparse

import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.training.datasets.data_samplers import build_pretraining_data_loader
from megatron.training.validation_sets import (
    ValidationSets,
    build_validation_sets,
    check_validation_set_args,
    validation_labels,
)
from tests.core.datasets.fixtures import TinyTokenizer, random_documents, write_dataset


class Samples(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "loss_mask": torch.ones(3)}


def _args(**kw):
    base = dict(full_validation=True, multiple_validation_sets=False, validation_set_names=None, mock_data=False,
                eval_micro_batch_size=None, micro_batch_size=2, eval_global_batch_size=None, global_batch_size=8,
                decrease_batch_size_if_needed=False, eval_iters=100, consumed_valid_samples=0,
                data_path=None, data_args_path=None, per_split_data_args_path=None,
                train_data_path=["t"], valid_data_path=["a"], test_data_path=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _reader(dp_rank, dp_size):
    def make(dataset, start):
        return build_pretraining_data_loader(dataset, start, micro_batch_size=2, data_parallel_rank=dp_rank,
                                             data_parallel_size=dp_size, num_workers=0)
    return make


@pytest.mark.parametrize("size", [19, 24, 3])
def test_each_evaluation_reads_every_sample_once_from_the_start(size):
    # Two data-parallel ranks, micro-batch 2, evaluation global batch 8 (two micro-batches each).
    per_rank = [build_validation_sets(_args(), Samples(size), 2, _reader(r, 2)) for r in range(2)]
    assert all(isinstance(s, ValidationSets) and len(s) == 1 for s in per_rank)
    iters = per_rank[0][0].eval_iters
    assert iters == -(-size // 8) and per_rank[1][0].eval_iters == iters
    for _evaluation in range(2):  # the second evaluation starts over at sample 0
        seen, masked = [], 0
        for _ in range(iters * 2):  # global batches x micro-batches per rank
            for sets in per_rank:
                batch = next(sets[0].iterator)
                for idx, mask in zip(batch["index"].tolist(), batch["loss_mask"]):
                    if mask.sum() > 0:
                        seen.append(idx)
                    else:
                        masked += 1
        assert sorted(seen) == list(range(size))
        assert masked == iters * 8 - size


def test_ranks_without_data_learn_the_batch_counts():
    sets = build_validation_sets(_args(), None, 1, _reader(0, 1))
    assert [(s.label, s.iterator) for s in sets] == [("validation", None)]


def test_labels_follow_the_prefixes_or_the_names():
    many = dict(multiple_validation_sets=True, valid_data_path=["a", "b", "c"])
    assert validation_labels(_args()) == ["validation"]
    assert validation_labels(_args(**many)) == ["validation-0", "validation-1", "validation-2"]
    assert validation_labels(_args(**many, validation_set_names=["x", "y", "z"])) == \
        ["validation-x", "validation-y", "validation-z"]
    with pytest.raises(ValueError, match="--validation-set-names gives 2 names for 3 validation sets"):
        validation_labels(_args(**many, validation_set_names=["x", "y"]))


def test_flag_combinations_megatron_refuses():
    with pytest.raises(ValueError, match="--multiple-validation-sets needs --full-validation"):
        check_validation_set_args(_args(full_validation=False, multiple_validation_sets=True))
    with pytest.raises(ValueError, match="--validation-set-names .* add that flag"):
        check_validation_set_args(_args(validation_set_names=["a"]))
    check_validation_set_args(_args(multiple_validation_sets=True))


def _prefixes(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return [write_dataset(str(tmp_path / n), random_documents(30, seed=i)) for i, n in enumerate("tab")]


def _valid(tmp_path, blend_per_split, sizes, **kw):
    config = GPTDatasetConfig(random_seed=1, sequence_length=16, path_to_cache=str(tmp_path / "c"),
                              tokenizer=TinyTokenizer(), blend_per_split=blend_per_split, **kw)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[1]


def test_builder_returns_one_validation_dataset_per_prefix(tmp_path):
    t, a, b = _prefixes(tmp_path)
    valid = _valid(tmp_path, [([t], None), ([a, b], [0.5, 0.5]), None], [20, None, 0],
                   multiple_validation_sets=True, full_validation=True)
    assert isinstance(valid, list) and [v.dataset_path for v in valid] == [a, b]
    # Each is the prefix's whole validation epoch, as if it were the only validation data.
    alone = [_valid(tmp_path / "alone", [None, ([p], None), None], [0, None, 0]) for p in (a, b)]
    assert [len(v) for v in valid] == [len(v) for v in alone] and len(valid[0]) != len(valid[1])
    # Without the flag the two prefixes are blended into one dataset.
    blended = _valid(tmp_path / "blend", [([t], None), ([a, b], None), None], [20, None, 0])
    assert not isinstance(blended, list) and len(blended) == sum(len(v) for v in alone)


def test_multiple_sets_need_a_per_split_validation_blend(tmp_path):
    t, _, _ = _prefixes(tmp_path)
    with pytest.raises(ValueError, match="--valid-data-path P1 P2"):
        GPTDatasetConfig(random_seed=1, sequence_length=16, blend=([t], None), split="1,1,1",
                         tokenizer=TinyTokenizer(), multiple_validation_sets=True)
