"""BERT's masked WordPiece dataset (Megatron-LM's ``BERTMaskedWordPieceDataset``).

Sample ``idx`` takes the sentences of sample-index row idx and a
``RandomState((seed + idx) % 2**32)``, then, in this order of draws:
1. with the binary head, a pivot splits the sentences into segments A and B (1 for two
   sentences, else uniform in [1, n)), and with probability 0.5 A and B are swapped
   (``is_random``); without it every sentence is in A and B is empty;
2. while A + B exceed the target length, the longer segment (B on a tie) loses its first
   or last token with probability 0.5 each;
3. ``[CLS] A [SEP] B [SEP]`` (no B part when B is empty) is masked (``masked_dataset``):
   each chosen token becomes [MASK] (80%), a random vocabulary id (10%) or stays (10%).
Fields, padded to --seq-length: ``text``; ``types`` (0 for [CLS] A [SEP], 1 for B [SEP]);
``labels`` (the original id where predicted, else -1); ``padding_mask`` (1 on tokens);
``loss_mask``; ``is_random``; ``truncated``. ``types`` and ``padding_mask`` are padded with
the tokenizer's pad id, as Megatron pads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import numpy

from megatron.core.datasets.masked_dataset import MaskedWordPieceDataset, MaskedWordPieceDatasetConfig
from megatron.core.datasets.megatron_dataset import LowLevelDataset
from megatron.core.datasets.split import Split

# [CLS] and two [SEP]s surround the text of every sample.
NUM_SPECIAL_TOKENS = 3


@dataclass
class BERTMaskedWordPieceDatasetConfig(MaskedWordPieceDatasetConfig):
    """Configuration of the BERT dataset."""

    classification_head: Optional[bool] = None
    """Build two segments for the binary (sentence-order) head (off with --bert-no-binary-head)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.classification_head is None:
            raise ValueError("BERTMaskedWordPieceDatasetConfig needs classification_head")
        if self.sequence_length <= NUM_SPECIAL_TOKENS + 1:
            raise ValueError(f"--seq-length {self.sequence_length} leaves no room for BERT's text; use more than 4")


class BERTMaskedWordPieceDataset(MaskedWordPieceDataset):
    """BERT samples from a sentence-level ``.bin/.idx`` (see the module docstring)."""

    def __init__(self, indexed_dataset: LowLevelDataset, dataset_path: Optional[str],
                 indexed_indices: numpy.ndarray, num_samples: Optional[int], index_split: Split,
                 config: BERTMaskedWordPieceDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.token_lookup = list(config.tokenizer.inv_vocab.keys())
        self.sample_index = self._build_sample_index(
            config.sequence_length - NUM_SPECIAL_TOKENS, 2 if config.classification_head else 1
        )

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MaskedWordPieceDataset._key_config_attributes() + ["classification_head"]

    def _segments(self, sentences: List[numpy.ndarray], random_state: numpy.random.RandomState):
        pivot = len(sentences)
        is_random = False
        if self.config.classification_head:
            if len(sentences) < 2:
                raise ValueError(f"a BERT sample with the binary head needs two sentences, got {len(sentences)}")
            pivot = 1 if len(sentences) < 3 else int(random_state.randint(low=1, high=len(sentences)))
            is_random = random_state.random() < 0.5
        first = [int(t) for sentence in sentences[:pivot] for t in sentence]
        second = [int(t) for sentence in sentences[pivot:] for t in sentence]
        if is_random:
            first, second = second, first
        return first, second, is_random

    @staticmethod
    def _truncate(first: List[int], second: List[int], target: int, random_state) -> bool:
        truncated = len(first) + len(second) > target
        while len(first) + len(second) > target:
            longer = first if len(first) > len(second) else second
            if random_state.random() < 0.5:
                del longer[0]
            else:
                del longer[-1]
        return truncated

    def __getitem__(self, idx: int) -> Dict[str, Union[int, numpy.ndarray]]:
        begin, end, target = (int(x) for x in self.sample_index[idx])
        sentences = [self.dataset[i] for i in range(begin, end)]
        random_state = numpy.random.RandomState(seed=(self.config.random_seed + idx) % 2**32)
        first, second, is_random = self._segments(sentences, random_state)
        truncated = self._truncate(first, second, target, random_state)

        tokenizer = self.config.tokenizer
        tokens = [tokenizer.cls, *first, tokenizer.sep]
        types = [0] * len(tokens)
        if second:
            tokens += [*second, tokenizer.sep]
            types += [1] * (len(second) + 1)
        tokens, positions, labels = self._create_masked_lm_predictions(tokens, target, random_state)

        seq = self.config.sequence_length
        pad = [tokenizer.pad] * (seq - len(tokens))
        label_array = numpy.full(seq, -1, dtype=numpy.int64)
        label_array[positions] = labels
        loss_mask = numpy.zeros(seq, dtype=numpy.int64)
        loss_mask[positions] = 1
        return {
            "text": numpy.array(tokens + pad, dtype=numpy.int64),
            "types": numpy.array(types + pad, dtype=numpy.int64),
            "labels": label_array,
            "is_random": int(is_random),
            "padding_mask": numpy.array([1] * len(tokens) + pad, dtype=numpy.int64),
            "loss_mask": loss_mask,
            "truncated": int(truncated),
        }

    def _get_token_mask(self, random_state: numpy.random.RandomState) -> Optional[int]:
        """[MASK] with probability 0.8, else a uniformly drawn vocabulary id or, with the
        same probability, the token itself (None)."""
        if random_state.random() < 0.8:
            return self.config.tokenizer.mask
        if random_state.random() >= 0.5:
            return self.token_lookup[random_state.randint(0, len(self.token_lookup))]
        return None
