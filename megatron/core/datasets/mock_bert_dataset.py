"""--mock-data for BERT: a synthetic sentence-level corpus run through the real BERT dataset.

``MockBERTLowLevelDataset`` has 10,000 documents of 8-48 sentences of 4-47 tokens (a fixed
``numpy.random.default_rng(0)`` draws the shape); sentence i holds ids drawn by
``default_rng(i)`` from the tokenizer's ordinary vocabulary (no bracketed special tokens,
no ``##`` continuations), so samples are reproducible and cheap to make. Documents of ~700
tokens on average fill samples of --seq-length 512 as real text does.
"""

from __future__ import annotations

from typing import Optional

import numpy

from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig

_NUM_DOCUMENTS = 10_000


class MockBERTLowLevelDataset:
    """Sentence-level stand-in for an ``IndexedDataset``: ``document_indices``,
    ``sequence_lengths`` and ``dataset[i]`` (sentence i)."""

    path_prefix = None

    def __init__(self, tokenizer):
        rng = numpy.random.default_rng(seed=0)
        sentences_per_document = rng.integers(8, 49, size=_NUM_DOCUMENTS)
        self.document_indices = numpy.concatenate(([0], numpy.cumsum(sentences_per_document))).astype(numpy.int64)
        self.sequence_lengths = rng.integers(4, 48, size=int(self.document_indices[-1])).astype(numpy.int32)
        words = [i for i, token in sorted(tokenizer.inv_vocab.items())
                 if not token.startswith(("[", "##", "<"))]
        self._words = numpy.array(words, dtype=numpy.int64)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> numpy.ndarray:
        rng = numpy.random.default_rng(seed=int(idx))
        return self._words[rng.integers(0, len(self._words), size=int(self.sequence_lengths[idx]))]


class MockBERTMaskedWordPieceDataset(BERTMaskedWordPieceDataset):
    """The BERT dataset over ``MockBERTLowLevelDataset``; indices are cached only with
    --data-cache-path."""

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str],
                                config: BERTMaskedWordPieceDatasetConfig) -> MockBERTLowLevelDataset:
        return MockBERTLowLevelDataset(config.tokenizer)
