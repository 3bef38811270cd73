"""A .bin holding a token id outside the tokenizer's vocabulary is refused when the GPT
dataset is built (not later, as an IndexError in a forward), naming the file, the id, the
vocabulary size and the fixes; the scan's result is kept in the cache directory."""

import os

import numpy
import pytest

from megatron.core.datasets import token_range
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from tests.core.datasets.fixtures import VOCAB, TinyTokenizer, random_documents, write_dataset


def _build(prefix, cache, vocab_size):
    config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend=([prefix], None), split="969, 30, 1",
                              path_to_cache=cache, tokenizer=TinyTokenizer(vocab_size=vocab_size))
    return BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True, config).build()[0]


def test_an_id_beyond_the_vocabulary_is_refused_when_building(tmp_path, monkeypatch):
    documents = random_documents(50, seed=3)
    documents[17] = documents[17].copy()
    documents[17][2] = VOCAB + 5
    prefix = write_dataset(str(tmp_path / "corpus_text_document"), documents)
    with pytest.raises(ValueError) as refused:
        _build(prefix, str(tmp_path / "cache"), VOCAB)
    message = str(refused.value)
    assert f"{prefix}.bin holds token id {VOCAB + 5}" in message and f"vocabulary of {VOCAB} ids" in message
    assert "--tokenizer-type" in message and "tools/verify_dataset.py" in message
    # a vocabulary that holds the id builds, and the next build reads the recorded range
    assert len(_build(prefix, str(tmp_path / "cache"), VOCAB + 6)) >= 20
    assert any(name.endswith("token_range.json") for name in os.listdir(tmp_path / "cache"))
    token_range._KNOWN.clear()
    monkeypatch.setattr(token_range, "token_range", lambda *a: pytest.fail("the .bin was scanned again"))
    _build(prefix, str(tmp_path / "cache"), VOCAB + 6)


def test_chunked_scan_finds_the_extremes(tmp_path, monkeypatch):
    monkeypatch.setattr(token_range, "SCAN_ITEMS", 7)
    values = numpy.array([5, 3, 9, 4, 2, 8, 1, 7, 6, 300, 4, 2, 0, 5, 5], dtype=numpy.uint16)
    path = tmp_path / "x.bin"
    values.tofile(path)
    assert token_range.token_range(str(path), numpy.uint16) == (0, 300)
