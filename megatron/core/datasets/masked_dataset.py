"""Base of the masked WordPiece datasets (BERT, T5): the sentence-packing sample index and
whole-word n-gram masking, as Megatron-LM's ``MaskedWordPieceDataset`` does them.

The low-level dataset must be sentence-level (``tools/preprocess_data.py
--split-sentences``): each sequence of the ``.bin/.idx`` is a sentence and its document
indices mark the documents. Splits divide documents. The sample index is cached as
``<md5>-<ClassName>-description.txt`` and ``<md5>-<ClassName>-sample_index.npy`` (no split
name in the file name: the split is inside the hashed description).

Masking, per sample, with the sample's ``numpy.random.RandomState``:
- candidates are whole words (a token starting with ``##`` joins the word before it) when
  ``masking_do_full_word``, else single tokens; [CLS] and [SEP] never are;
- the masking budget is ``min(p * target_length, max(1, round(len(tokens) * p)))``;
- candidates are visited in a shuffled order; each draws an n-gram size (P(n) ~ 1/n for
  n <= ``masking_max_ngram``, reversed with ``masking_use_longer_ngrams``, or SpanBERT's
  Geometric(0.2) clipped) and falls back to smaller n while the n-gram of words starting
  at the candidate would overrun the budget; n-grams that overlap masked tokens are
  skipped; each masked token asks the subclass for its replacement (``_get_token_mask``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.index_cache import IndexCache, global_rank
from megatron.core.datasets.masked_sample_index import build_sample_index
from megatron.core.datasets.megatron_dataset import LowLevelDataset, MegatronDataset
from megatron.core.datasets.split import Split

logger = logging.getLogger(__name__)

_SPECIAL_TOKENS = ("cls", "sep", "mask", "pad")


@dataclass
class MaskedWordPieceDatasetConfig(BlendedMegatronDatasetConfig):
    """Configuration of masked WordPiece datasets (names follow Megatron-Core's)."""

    masking_probability: Optional[float] = None
    """Fraction of tokens to predict (--mask-prob)."""

    short_sequence_probability: Optional[float] = None
    """Probability of a shorter target length (--short-seq-prob)."""

    masking_max_ngram: Optional[int] = None
    """Longest n-gram of words masked together."""

    masking_do_full_word: Optional[bool] = None
    """Mask whole words (WordPiece continuations with their word)."""

    masking_do_permutation: Optional[bool] = None
    """Also permute n-grams (not supported: Megatron draws it from the global numpy RNG)."""

    masking_use_longer_ngrams: Optional[bool] = None
    """Favour longer n-grams (P(n) ~ 1/n reversed)."""

    masking_use_geometric_distribution: Optional[bool] = None
    """Draw n from Geometric(0.2) clipped to masking_max_ngram (SpanBERT)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tokenizer(self.tokenizer)
        for name in ("masking_probability", "short_sequence_probability", "masking_max_ngram",
                     "masking_do_full_word", "masking_do_permutation", "masking_use_longer_ngrams",
                     "masking_use_geometric_distribution"):
            if getattr(self, name) is None:
                raise ValueError(f"{type(self).__name__} needs {name}")
        if not 0 < self.masking_probability < 1:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.masking_probability}")
        if not 0 <= self.short_sequence_probability <= 1:
            raise ValueError(f"--short-seq-prob must be in [0, 1], got {self.short_sequence_probability}")
        if self.masking_max_ngram < 1:
            raise ValueError(f"masking_max_ngram must be >= 1, got {self.masking_max_ngram}")
        if self.masking_do_permutation:
            raise ValueError("masking_do_permutation is not supported (Megatron draws it from numpy's global "
                             "RNG, so its samples are not reproducible): set it to False")


def _check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("masked datasets need a WordPiece tokenizer (pass tokenizer=)")
    missing = [name for name in _SPECIAL_TOKENS if getattr(tokenizer, name, None) is None]
    if missing or getattr(tokenizer, "inv_vocab", None) is None:
        raise ValueError(
            f"the tokenizer {type(tokenizer).__name__} has no {', '.join(missing) or 'inv_vocab'} token: masked "
            "(BERT) datasets need [CLS], [SEP], [MASK] and [PAD]; use --tokenizer-type BertWordPieceLowerCase or "
            "BertWordPieceCase with a BERT vocab.txt, or a HuggingFaceTokenizer that defines them"
        )


class MaskedWordPieceDataset(MegatronDataset):
    """Samples of whole sentences from a sentence-level ``.bin/.idx``; subclasses build the
    sample layout (``__getitem__``) and the replacement of masked tokens."""

    def __init__(self, indexed_dataset: LowLevelDataset, dataset_path: Optional[str],
                 indexed_indices: numpy.ndarray, num_samples: Optional[int], index_split: Split,
                 config: MaskedWordPieceDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        if len(indexed_indices) == 0:
            raise ValueError(
                f"the {index_split.name} split of {dataset_path} holds no documents; change --split or the data"
            )
        self.built_anew_on_cache_miss = False

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: LowLevelDataset) -> int:
        """Masked datasets split by document."""
        return low_level_dataset.document_indices.shape[0] - 1

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: MaskedWordPieceDatasetConfig) -> LowLevelDataset:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + [
            "masking_probability", "short_sequence_probability", "masking_max_ngram", "masking_do_full_word",
            "masking_do_permutation", "masking_use_longer_ngrams", "masking_use_geometric_distribution",
        ]

    def __len__(self) -> int:
        return self.sample_index.shape[0]

    def _cache(self) -> Optional[IndexCache]:
        directory = self.config.path_to_cache
        if directory is None and not self.config.mock:
            prefix = getattr(self.dataset, "path_prefix", self.dataset_path)
            directory = os.path.join(prefix, "cache", f"{type(self).__name__}_indices")
        if not directory:
            return None
        return IndexCache(directory, f"{self.unique_description_hash}-{type(self).__name__}", ["sample_index"])

    def _document_boundaries(self) -> numpy.ndarray:
        """Sentence boundaries of this split's documents, [D + 1]."""
        return numpy.asarray(self.dataset.document_indices)[numpy.append(self.indices, self.indices[-1] + 1)]

    def _build_sample_index(self, max_length: int, min_sentences: int) -> numpy.ndarray:
        cache = self._cache()
        if cache is not None and cache.hit():
            logger.info("loading the %s %s sample index from %s", type(self).__name__, self.index_split.name,
                        cache.directory)
            return cache.load()["sample_index"]
        started = time.time()
        boundaries = self._document_boundaries()
        self._check_sentence_level(boundaries, min_sentences)
        # With a target count, epochs repeat until it is reached; without, one epoch.
        num_epochs = numpy.iinfo(numpy.int32).max - 1 if self.num_samples is not None else 1
        index = build_sample_index(
            boundaries, self.dataset.sequence_lengths, num_epochs, self.num_samples, max_length,
            self.config.short_sequence_probability, self.config.random_seed, min_sentences,
        )
        if index.shape[0] == 0:
            raise ValueError(
                f"the {self.index_split.name} split of {self.dataset_path} gives no samples: no document has "
                f"{min_sentences} or more sentences of at most 512 tokens each"
            )
        self.built_anew_on_cache_miss = True
        if cache is not None and global_rank() == 0:
            cache.save(self.unique_description, {"sample_index": index})
        logger.info("built %d %s samples in %.2f s", index.shape[0], self.index_split.name, time.time() - started)
        return index

    def _check_sentence_level(self, boundaries: numpy.ndarray, min_sentences: int) -> None:
        if min_sentences > 1 and int(numpy.diff(boundaries).max()) <= 1:
            raise ValueError(
                f"{self.dataset_path}: every document is a single sequence, so this looks like a document-level "
                ".bin/.idx; BERT's binary head needs sentence-level data: preprocess with tools/preprocess_data.py "
                "--split-sentences (or train with --bert-no-binary-head)"
            )

    def _get_token_mask(self, random_state: numpy.random.RandomState) -> Optional[int]:
        """The id that replaces a masked token, or None to keep it."""
        raise NotImplementedError

    def _candidates(self, token_ids: List[int]) -> List[List[int]]:
        tokenizer = self.config.tokenizer
        specials = (tokenizer.cls, tokenizer.sep)
        inv_vocab = tokenizer.inv_vocab
        candidates: List[List[int]] = []
        for position, token_id in enumerate(token_ids):
            if token_id in specials:
                continue
            continues_word = inv_vocab[token_id].startswith("##")
            if continues_word and self.config.masking_do_full_word and candidates:
                candidates[-1].append(position)
            else:
                candidates.append([position])
        return candidates

    def _ngram_size(self, random_state: numpy.random.RandomState, sizes: numpy.ndarray, cdf: numpy.ndarray) -> int:
        if self.config.masking_use_geometric_distribution:
            return min(int(random_state.geometric(0.2)), self.config.masking_max_ngram)
        # random_state.choice(sizes, p=p) draws exactly this (one random_sample, searched in
        # p's normalized cumulative sum) after validating p on every call, which made it
        # two thirds of the time of building a sample
        return int(sizes[cdf.searchsorted(random_state.random_sample(), side="right")])

    @staticmethod
    def _choice_cdf(probs: numpy.ndarray) -> numpy.ndarray:
        """The cumulative distribution ``RandomState.choice`` builds from ``p``."""
        cdf = (probs / probs.sum(keepdims=True)).cumsum()
        cdf /= cdf[-1]
        return cdf

    def _create_masked_lm_predictions(
        self, token_ids: List[int], target_length: int, random_state: numpy.random.RandomState
    ) -> Tuple[List[int], List[int], List[int]]:
        """(masked token ids, masked positions in order, their original ids)."""
        candidates = self._candidates(token_ids)
        p = self.config.masking_probability
        budget = min(p * target_length, max(1, int(round(len(token_ids) * p))))
        sizes = numpy.arange(self.config.masking_max_ngram, dtype=numpy.int64) + 1
        probs = 1.0 / sizes
        probs = probs / probs.sum(keepdims=True)
        if self.config.masking_use_longer_ngrams:
            probs = probs[::-1]
        cdf = self._choice_cdf(probs)
        order = list(range(len(candidates)))
        random_state.shuffle(order)

        masked = list(token_ids)
        predictions: List[Tuple[int, int]] = []
        taken = set()
        for start in order:
            if len(predictions) >= budget:
                break
            n = self._ngram_size(random_state, sizes, cdf)
            positions = self._fitting_ngram(candidates, start, n, budget, len(predictions))
            if positions is None or any(pos in taken for pos in positions):
                continue
            for pos in positions:
                taken.add(pos)
                replacement = self._get_token_mask(random_state)
                masked[pos] = token_ids[pos] if replacement is None else replacement
                predictions.append((pos, token_ids[pos]))
        # Megatron reshuffles the candidates once more (for permutation); keep its draws.
        random_state.shuffle(order)
        predictions.sort(key=lambda item: item[0])
        return masked, [pos for pos, _ in predictions], [label for _, label in predictions]

    @staticmethod
    def _fitting_ngram(candidates: List[List[int]], start: int, n: int, budget: float, used: int) -> Optional[List[int]]:
        """Positions of the largest n-gram of words from ``start`` (n, n-1, ..., 1) that keeps
        ``used`` masks within ``budget``; None when even one word does not. Near the end
        the n words may be fewer."""
        while n >= 1:
            positions = [pos for word in candidates[start:start + n] for pos in word]
            if budget >= used + len(positions):
                return positions
            n -= 1
        return None
