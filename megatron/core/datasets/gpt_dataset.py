"""GPT samples of ``seq_length + 1`` tokens drawn from a low-level document dataset.

The index construction follows Megatron-LM (megatron-facts section 3.3): a shuffled
document index (tiled over epochs), a sample index whose consecutive samples share one
token, and a shuffled sample order, all drawn from one ``numpy.random.RandomState(seed)``
in that order. Here the sample index is computed with numpy (cumulative lengths and a
search) instead of a compiled helper; it gives the same boundaries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol

import numpy
import torch

logger = logging.getLogger(__name__)


class LowLevelDataset(Protocol):
    """What GPTDataset needs from its source of documents."""

    sequence_lengths: numpy.ndarray

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray: ...


@dataclass
class GPTDatasetConfig:
    """Configuration of GPT datasets (names follow Megatron-Core's)."""

    random_seed: int
    """Seed of every shuffle (--seed)."""

    sequence_length: int
    """Tokens per sample, excluding the extra label token (--seq-length)."""

    tokenizer: object = None
    """Tokenizer with ``eod`` and ``pad`` ids."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token (--reset-position-ids)."""

    reset_attention_mask: bool = False
    """Block attention across end-of-document tokens (--reset-attention-mask)."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss (--eod-mask-loss)."""

    create_attention_mask: bool = True
    """Return a [1, s, s] causal mask (off with --no-create-attention-mask-in-dataloader)."""

    mock: bool = False
    """Use synthetic documents instead of files (--mock-data)."""

    extra: Dict = field(default_factory=dict)


class MockGPTLowLevelDataset:
    """100,000 synthetic documents, as Megatron's ``MockGPTLowLevelDataset``.

    Document d has a length L drawn uniformly from [1, 4096) by
    ``numpy.random.default_rng(seed=0)`` and holds ``(arange(L - 1) + 1) % vocab_size``
    followed by the end-of-document id.
    """

    size = 100_000
    max_sequence_length = 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        rng = numpy.random.default_rng(seed=0)
        self.sequence_lengths = rng.integers(1, self.max_sequence_length, size=self.size, dtype=numpy.int32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> numpy.ndarray:
        length = int(self.sequence_lengths[idx])
        body = (numpy.arange(length - 1, dtype=numpy.int64) + 1) % self.tokenizer.vocab_size
        return numpy.concatenate([body, numpy.array([self.tokenizer.eod], dtype=numpy.int64)])

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        tokens = self[idx]
        end = None if length is None else offset + length
        return tokens[offset:end]


def _build_document_index(indices: numpy.ndarray, num_epochs: int, rng, separate_final_epoch: bool) -> numpy.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        doc_idx = numpy.tile(indices, num_epochs).astype(numpy.int32)
        rng.shuffle(doc_idx)
        return doc_idx
    first = _build_document_index(indices, num_epochs - 1, rng, False)
    last = _build_document_index(indices, 1, rng, False)
    return numpy.concatenate([first, last])


def build_sample_index(lengths: numpy.ndarray, document_index: numpy.ndarray, seq_length: int, num_samples: int) -> numpy.ndarray:
    """Rows (position in document_index, offset in that document) where each sample starts.

    Sample i covers global tokens [i*S, i*S + S] of the concatenated documents (S + 1
    tokens), so the next sample starts at this one's last token. Returns
    ``num_samples + 1`` rows; the last row is where the final sample ends.
    """
    doc_lengths = lengths[document_index].astype(numpy.int64)
    ends = numpy.cumsum(doc_lengths)
    starts = numpy.arange(num_samples + 1, dtype=numpy.int64) * seq_length
    # A boundary that lands exactly on a document end belongs to the next document,
    # except the final boundary, which Megatron records as the end of the last document.
    positions = numpy.searchsorted(ends, starts, side="right")
    last = positions >= len(ends)
    positions = numpy.minimum(positions, len(ends) - 1)
    offsets = starts - (ends[positions] - doc_lengths[positions])
    offsets[last] = doc_lengths[positions[last]]
    dtype = numpy.int64 if max(len(document_index), int(lengths.max(initial=0))) > numpy.iinfo(numpy.int32).max else numpy.int32
    return numpy.stack([positions, offsets], axis=1).astype(dtype)


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length GPT samples over ``indices`` of ``low_level``.

    ``num_samples`` None means one epoch. Items are dicts with ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids`` and (unless disabled) ``attention_mask``.
    """

    def __init__(self, low_level: LowLevelDataset, indices: numpy.ndarray, num_samples: Optional[int], config: GPTDatasetConfig):
        self.low_level = low_level
        self.config = config
        self.indices = numpy.asarray(indices, dtype=numpy.int32)
        if len(self.indices) == 0:
            raise ValueError("GPTDataset got no documents: the split is empty; change --split or the data")
        self.document_index, self.sample_index, self.shuffle_index = self._build_indices(num_samples)

    def _build_indices(self, num_samples: Optional[int]):
        S = self.config.sequence_length
        lengths = numpy.asarray(self.low_level.sequence_lengths)
        tokens_per_epoch = int(lengths[self.indices].sum())
        if tokens_per_epoch <= S:
            raise ValueError(
                f"the dataset holds {tokens_per_epoch} tokens, too few for one sample of "
                f"--seq-length {S}; use more data or a shorter sequence"
            )
        if num_samples is None:
            num_epochs = 1
        else:
            num_epochs = max(1, -(-(num_samples * S + 1) // tokens_per_epoch))
        separate_final_epoch = False
        if num_epochs > 1:
            n_before = ((num_epochs - 1) * tokens_per_epoch - 1) // S
            n_last = num_samples - n_before
            n_per_epoch = (tokens_per_epoch - 1) // S
            separate_final_epoch = n_last < int(0.80 * n_per_epoch)
        rng = numpy.random.RandomState(self.config.random_seed)
        document_index = _build_document_index(self.indices, num_epochs, rng, separate_final_epoch)
        n_samples = (num_epochs * tokens_per_epoch - 1) // S
        sample_index = build_sample_index(lengths, document_index, S, n_samples)
        if separate_final_epoch:
            n_before = ((num_epochs - 1) * tokens_per_epoch - 1) // S
            shuffle_index = numpy.concatenate(
                [_permutation(0, n_before, rng), _permutation(n_before, n_samples, rng)]
            )
        else:
            shuffle_index = _permutation(0, n_samples, rng)
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def _sample_tokens(self, idx: int) -> numpy.ndarray:
        j = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(v) for v in self.sample_index[j])
        doc_end, off_end = (int(v) for v in self.sample_index[j + 1])
        pieces = []
        for pos in range(doc_beg, doc_end + 1):
            doc = int(self.document_index[pos])
            start = off_beg if pos == doc_beg else 0
            stop = off_end + 1 if pos == doc_end else None
            length = None if stop is None else stop - start
            pieces.append(self.low_level.get(doc, offset=start, length=length))
        tokens = numpy.concatenate(pieces).astype(numpy.int64)
        want = self.config.sequence_length + 1
        if len(tokens) < want:
            pad = self.config.tokenizer.pad if self.config.tokenizer.pad >= 0 else self.config.tokenizer.eod
            tokens = numpy.concatenate([tokens, numpy.full(want - len(tokens), pad, dtype=numpy.int64)])
        return tokens[:want]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        text = torch.from_numpy(self._sample_tokens(idx))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        return build_sample(tokens, labels, self.config)


def _permutation(start: int, stop: int, rng) -> numpy.ndarray:
    dtype = numpy.int64 if stop >= numpy.iinfo(numpy.uint32).max - 1 else numpy.uint32
    out = numpy.arange(start, stop, dtype=dtype)
    rng.shuffle(out)
    return out


def build_sample(tokens: torch.Tensor, labels: torch.Tensor, config: GPTDatasetConfig) -> Dict[str, torch.Tensor]:
    """Masks and positions for one sample, as Megatron's GPT dataset returns them."""
    tok = config.tokenizer
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float)
    if tok.pad >= 0 and tok.pad != tok.eod:
        loss_mask[labels == tok.pad] = 0.0
    if config.eod_mask_loss:
        loss_mask[tokens == tok.eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    attention_mask = None
    if config.create_attention_mask or config.reset_attention_mask:
        attention_mask = torch.tril(torch.ones(s, s, dtype=torch.bool))
    if config.reset_position_ids or config.reset_attention_mask:
        eod_positions = (tokens == tok.eod).nonzero().flatten().tolist()
        prev = 0
        for i in eod_positions:
            if config.reset_attention_mask and attention_mask is not None:
                attention_mask[i + 1 :, : i + 1] = False
            if config.reset_position_ids:
                position_ids[i + 1 :] -= i + 1 - prev
                prev = i + 1
    sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if attention_mask is not None:
        sample["attention_mask"] = (~attention_mask).unsqueeze(0)  # True = masked, [1, s, s]
    return sample


SPLITS = ("train", "valid", "test")


def split_range(num_elements: int, weights, index_split: str):
    """Contiguous element range [start, end) of one split, as Megatron splits (no shuffle)."""
    total = float(sum(weights))
    bounds = numpy.cumsum([0.0] + [w / total for w in weights])
    i = SPLITS.index(index_split)
    return int(round(bounds[i] * num_elements)), int(round(bounds[i + 1] * num_elements))


class MockGPTDataset(GPTDataset):
    """GPTDataset over ``MockGPTLowLevelDataset`` for --mock-data.

    As in Megatron, mock data uses the split "1,1,1": each of train, valid and test gets
    its own third of the synthetic documents.
    """

    def __init__(self, num_samples: Optional[int], config: GPTDatasetConfig, index_split: str = "train"):
        low_level = MockGPTLowLevelDataset(config.tokenizer)
        start, end = split_range(len(low_level), (1, 1, 1), index_split)
        super().__init__(low_level, numpy.arange(start, end, dtype=numpy.int32), num_samples, config)
