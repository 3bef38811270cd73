"""Megatron-Core's ``datasets.utils`` names and the GPTDatasetConfig fields it adds."""

import pytest

from megatron.core.datasets import utils
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.split import Split


class _Tokenizer:
    eod = 0
    pad = -1


def _config(**kwargs):
    return GPTDatasetConfig(random_seed=1, sequence_length=8, split="1,0,0", tokenizer=_Tokenizer(), **kwargs)


def test_utils_names():
    assert utils.Split is Split and [s.name for s in utils.Split] == ["train", "valid", "test"]
    assert utils.get_blend_from_list(["2", "a", "1", "b"]) == (["a", "b"], [2.0, 1.0])
    assert utils.normalize([1, 3]) == [0.25, 0.75]
    assert utils.compile_helpers() is None


def test_gpt_dataset_config_new_fields():
    assert _config(fast_cache_load=True).fast_cache_load
    with pytest.raises(ValueError, match="reset_attention_mask=True"):
        _config(inter_document_masking=True)
    assert not _config().inter_document_masking
