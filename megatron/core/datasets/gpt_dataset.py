"""GPT samples of ``seq_length + 1`` tokens drawn from a low-level document dataset.

Indices are built as Megatron-LM builds them (``gpt_indices``) and cached under
``path_to_cache`` with Megatron's file names (``index_cache``); samples, masks and
position ids follow megatron-facts section 3.3.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.gpt_indices import build_gpt_indices
from megatron.core.datasets.gpt_masks import get_ltor_masks_and_position_ids
from megatron.core.datasets.index_cache import IndexCache, global_rank
from megatron.core.datasets.megatron_dataset import LowLevelDataset, MegatronDataset
from megatron.core.datasets.split import Split
from megatron.core.datasets.token_range import check_token_ids

logger = logging.getLogger(__name__)

_PAD_TOKEN_ID = -1
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


@dataclass
class GPTDatasetConfig(BlendedMegatronDatasetConfig):
    """Configuration of GPT datasets (names follow Megatron-Core's)."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token (--reset-position-ids)."""

    reset_attention_mask: bool = False
    """Block attention across end-of-document tokens (--reset-attention-mask)."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss (--eod-mask-loss)."""

    create_attention_mask: bool = True
    """Return a [1, s, s] mask (off with --no-create-attention-mask-in-dataloader)."""

    drop_last_partial_validation_sequence: bool = True
    """Drop the validation split's final partial sample instead of padding it."""

    add_extra_token_to_sequence: bool = True
    """Draw ``seq_length + 1`` tokens so that inputs and labels both have ``seq_length``."""

    allow_ambiguous_pad_tokens: bool = False
    """Keep masking the pad id even when it equals the eod, bos or eos id (--allow-ambiguous-pad-tokens)."""

    fast_cache_load: bool = False
    """Megatron-Core's switch for a quicker index-cache load; accepted without effect (the
    cached indices here are always memory-mapped as they are read)."""

    inter_document_masking: bool = False
    """Megatron-Core's per-document attention masking; not built here: True raises ValueError
    (``reset_attention_mask=True`` blocks attention across end-of-document tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inter_document_masking:
            raise ValueError("GPTDatasetConfig(inter_document_masking=True) is not supported; "
                             "use reset_attention_mask=True (--reset-attention-mask) to block attention across documents")
        if self.tokenizer is None:
            raise ValueError("GPTDatasetConfig needs a tokenizer (its eod and pad ids); pass tokenizer=")


def _pad_token_id(config: GPTDatasetConfig) -> int:
    """The id whose labels are masked out, or -1. A pad id shared with eod/bos/eos (common
    for Hugging Face tokenizers) would mask real tokens, so it is dropped unless allowed."""
    tokenizer = config.tokenizer
    pad = getattr(tokenizer, "pad", None)
    if pad is None or pad < 0:
        return _PAD_TOKEN_ID
    clashes = [name for name in ("eod", "bos", "eos") if getattr(tokenizer, name, None) == pad]
    if clashes and not config.allow_ambiguous_pad_tokens:
        logger.warning("the pad id %d is also the %s id; padding is not masked by id "
                       "(pass --allow-ambiguous-pad-tokens to mask it anyway)", pad, "/".join(clashes))
        return _PAD_TOKEN_ID
    return int(pad)


class GPTDataset(MegatronDataset):
    """Fixed-length GPT samples over ``indexed_indices`` of ``indexed_dataset``.

    ``num_samples`` None means one epoch. Items are dicts of ``tokens``, ``labels``
    (int64 [S]), ``loss_mask`` (float [S]), ``position_ids`` (int64 [S]) and, when
    ``create_attention_mask``, ``attention_mask`` (bool [1, S, S], True = masked).
    """

    def __init__(self, indexed_dataset: LowLevelDataset, dataset_path: Optional[str],
                 indexed_indices: numpy.ndarray, num_samples: Optional[int], index_split: Split,
                 config: GPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        if len(indexed_indices) == 0:
            raise ValueError(
                f"the {index_split.name} split of {dataset_path} holds no documents; change --split or the data"
            )
        self._pad_token_id = _pad_token_id(config)
        cache = self._cache()
        check_token_ids(self.dataset, getattr(config.tokenizer, "vocab_size", None),
                        cache.directory if cache is not None else None)
        self.built_anew_on_cache_miss = False
        self.document_index, self.sample_index, self.shuffle_index = self._build_document_sample_shuffle_indices()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: LowLevelDataset) -> int:
        """GPT splits by sequence (one per document unless sentence-split)."""
        return low_level_dataset.sequence_lengths.shape[0]

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> LowLevelDataset:
        """The ``IndexedDataset`` at ``dataset_path`` (.bin/.idx prefix)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    def _cache(self) -> Optional[IndexCache]:
        directory = self.config.path_to_cache
        if directory is None and not self.config.mock:
            prefix = getattr(self.dataset, "path_prefix", self.dataset_path)
            directory = os.path.join(prefix, "cache", f"{type(self).__name__}_indices")
        if not directory:
            return None
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        return IndexCache(directory, base, _INDEX_NAMES)

    def _build_document_sample_shuffle_indices(self):
        cache = self._cache()
        if cache is not None and cache.hit():
            logger.info("loading the %s %s indices from %s", type(self).__name__, self.index_split.name,
                        cache.directory)
            arrays = cache.load()
            return tuple(arrays[name] for name in _INDEX_NAMES)
        started = time.time()
        drop_last = True
        if self.index_split == Split.valid:
            drop_last = self.config.drop_last_partial_validation_sequence
        arrays = build_gpt_indices(
            self.dataset.sequence_lengths, self.indices, self.config.sequence_length, self.num_samples,
            self.config.random_seed, drop_last, self.config.add_extra_token_to_sequence,
        )
        self.built_anew_on_cache_miss = True
        if cache is not None and global_rank() == 0:
            cache.save(self.unique_description, dict(zip(_INDEX_NAMES, arrays)))
        elif cache is not None:
            logger.warning("rank %d found no cache at %s and built the indices in memory", global_rank(),
                           cache.directory)
        logger.info("built %d %s samples (%d epochs) in %.2f s", arrays[1].shape[0] - 1,
                    self.index_split.name, len(arrays[0]) // max(1, len(self.indices)), time.time() - started)
        return arrays

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def _query_document_sample_shuffle_indices(self, idx: int) -> numpy.ndarray:
        """The ``S + 1`` (or S) token ids of sample ``idx``, padded with the pad id."""
        extra = int(self.config.add_extra_token_to_sequence)
        j = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(v) for v in self.sample_index[j])
        doc_end, off_end = (int(v) for v in self.sample_index[j + 1])
        parts: List[numpy.ndarray] = []
        for pos in range(doc_beg, doc_end + 1):
            offset = off_beg if pos == doc_beg else 0
            length = None if pos < doc_end else off_end - offset + extra
            parts.append(numpy.asarray(self.dataset.get(int(self.document_index[pos]), offset=offset, length=length)))
        want = self.config.sequence_length + extra
        have = sum(len(p) for p in parts)
        if have < want:
            parts.append(numpy.full(want - have, self._pad_token_id, dtype=numpy.int64))
        return numpy.concatenate(parts).astype(numpy.int64)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        """Sample ``idx``; None gives a padding sample whose loss mask is all zero."""
        text = torch.from_numpy(self._query_document_sample_shuffle_indices(0 if idx is None else idx))
        if self.config.add_extra_token_to_sequence:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:
            tokens = text
            labels = torch.roll(text, shifts=-1, dims=0)
            labels[-1] = self._pad_token_id
        attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
            tokens, self.config.tokenizer.eod, self.config.reset_position_ids, self.config.reset_attention_mask,
            self.config.eod_mask_loss, self.config.create_attention_mask,
        )
        # Padding is masked out of the loss and mapped to id 0 so the embedding can look it up.
        loss_mask[labels == self._pad_token_id] = 0.0
        tokens[tokens == self._pad_token_id] = 0
        labels[labels == self._pad_token_id] = 0
        if idx is None:
            loss_mask = torch.zeros_like(loss_mask)
        sample = {"tokens": tokens, "labels": labels}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        sample["loss_mask"] = loss_mask
        sample["position_ids"] = position_ids
        return sample


class MockGPTLowLevelDataset:
    """100,000 synthetic documents, as Megatron's ``MockGPTLowLevelDataset``.

    Document d has a length L drawn uniformly from [1, 4096) by
    ``numpy.random.default_rng(seed=0)`` and holds ``(arange(L - 1) + 1) % vocab_size``
    followed by the end-of-document id.
    """

    seed = 0
    size = 100_000
    max_sequence_length = 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        rng = numpy.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(1, self.max_sequence_length, size=self.size, dtype=numpy.int32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> numpy.ndarray:
        length = int(self.sequence_lengths[idx])
        body = (numpy.arange(length - 1, dtype=numpy.int64) + 1) % self.tokenizer.vocab_size
        return numpy.concatenate([body, numpy.array([self.tokenizer.eod], dtype=numpy.int64)])

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        end = None if length is None else offset + length
        return self[idx][offset:end]


class MockGPTDataset(GPTDataset):
    """GPTDataset over ``MockGPTLowLevelDataset`` (--mock-data); needs a mock config."""

    def __init__(self, dataset: MockGPTLowLevelDataset, dataset_path: Optional[str], indices: numpy.ndarray,
                 num_samples: Optional[int], index_split: Split, config: GPTDatasetConfig) -> None:
        if not config.mock:
            raise ValueError("MockGPTDataset needs a mock config (no blend); drop --data-path or use GPTDataset")
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MockGPTLowLevelDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config: GPTDatasetConfig) -> MockGPTLowLevelDataset:
        return MockGPTLowLevelDataset(config.tokenizer)
