"""Documents to token arrays: the work of each --workers process.

A batch of raw input lines goes in; for each json key, the tokens of the batch's good
documents come out as one array in the dataset dtype, with their sequence lengths and
document ends, so that little crosses the process boundary and the writer appends a batch
with a few calls. Bad lines are returned (not raised), so the writer can stop at the first
one in input order or skip them.

Encoding follows Megatron's ``Encoder.encode``: the text is split into sentences (or kept
whole), each sentence tokenized, empty sentences dropped, and with --append-eod the eod id
appended to the last sequence of a non-empty document.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy

from megatron.training.data_preprocessing.json_lines import LineProblem, Text, parse_document
from megatron.training.data_preprocessing.sentence_splitter import Splitter, build_splitter


@dataclass
class LineBatch:
    """Consecutive non-blank lines of one input file: ``(line number, raw bytes)`` each."""

    file_index: int
    lines: List[Tuple[int, bytes]]


@dataclass
class KeyTokens:
    """One json key's share of a batch.

    ``tokens``: all token ids of the good documents, in the dataset dtype; ``sequence_lengths``
    int32, one per sequence; ``document_ends`` int64, for each document the number of
    sequences from the batch start to the document's end (equal neighbours: an empty document).
    """

    tokens: numpy.ndarray
    sequence_lengths: numpy.ndarray
    document_ends: numpy.ndarray


@dataclass
class BadLine:
    """An input line that is not a valid document."""

    lineno: int
    reason: str
    snippet: str
    raw: bytes


@dataclass
class EncodedBatch:
    """What a worker returns for a ``LineBatch``."""

    file_index: int
    documents: int = 0
    bytes_read: int = 0
    bad_lines: List[BadLine] = field(default_factory=list)
    keys: Dict[str, KeyTokens] = field(default_factory=dict)


class DocumentEncoder:
    """Tokenizes documents of the keys ``json_keys`` into arrays of ``dtype``."""

    def __init__(self, tokenizer, splitter: Splitter, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = numpy.dtype(dtype)
        self.eod = tokenizer.eod if append_eod else None
        if append_eod and self.eod is None:
            raise ValueError(
                f"--append-eod: the tokenizer {type(tokenizer).__name__} has no end-of-document token; "
                "drop --append-eod or choose a tokenizer with one"
            )

    def encode_text(self, text: Text) -> Tuple[List[int], List[int]]:
        """(token ids, sequence lengths) of one document's text (a string, or a list of sentences)."""
        sentences = text if isinstance(text, list) else self.splitter(text)
        tokenize = self.tokenizer.tokenize
        ids: List[int] = []
        lengths: List[int] = []
        for sentence in sentences:
            sentence_ids = tokenize(sentence)
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if ids and self.append_eod:
            ids.append(self.eod)
            lengths[-1] += 1
        return ids, lengths

    def encode_batch(self, batch: LineBatch) -> EncodedBatch:
        out = EncodedBatch(batch.file_index)
        ids = {key: [] for key in self.json_keys}
        lengths = {key: [] for key in self.json_keys}
        ends = {key: [] for key in self.json_keys}
        for lineno, raw in batch.lines:
            try:
                texts = parse_document(raw, lineno, self.json_keys)
            except LineProblem as problem:
                out.bad_lines.append(BadLine(lineno, problem.reason, problem.snippet, raw))
                continue
            encoded = [(key, self.encode_text(texts[key])) for key in self.json_keys]
            for key, (doc_ids, doc_lengths) in encoded:
                ids[key].extend(doc_ids)
                lengths[key].extend(doc_lengths)
                ends[key].append(len(lengths[key]))
            out.documents += 1
            out.bytes_read += len(raw)
        for key in self.json_keys:
            out.keys[key] = KeyTokens(
                self._as_dtype(ids[key]),
                numpy.array(lengths[key], dtype=numpy.int32),
                numpy.array(ends[key], dtype=numpy.int64),
            )
        return out

    def _as_dtype(self, ids: List[int]) -> numpy.ndarray:
        try:
            return numpy.array(ids, dtype=self.dtype)
        except OverflowError:
            wide = numpy.array(ids, dtype=numpy.int64)
            raise ValueError(
                f"the tokenizer produced ids in [{wide.min()}, {wide.max()}], which do not fit the dataset "
                f"dtype {self.dtype.name} chosen from its vocab size {self.tokenizer.vocab_size}"
            ) from None


@dataclass
class EncoderConfig:
    """Everything needed to rebuild the encoder in a freshly started worker process."""

    tokenizer_args: Namespace
    json_keys: List[str]
    split_sentences: bool
    lang: str
    keep_newlines: bool
    append_eod: bool
    dtype: Optional[str] = None


def build_encoder(config: EncoderConfig, tokenizer=None) -> DocumentEncoder:
    """Build the tokenizer (unless given), the splitter and the encoder for ``config``."""
    from megatron.core.datasets.indexed_dataset import DType

    if tokenizer is None:
        from megatron.training.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(config.tokenizer_args)
    splitter = build_splitter(config.split_sentences, config.lang, config.keep_newlines)
    dtype = config.dtype or numpy.dtype(DType.optimal_dtype(tokenizer.vocab_size)).name
    return DocumentEncoder(tokenizer, splitter, config.json_keys, config.append_eod, dtype)


_WORKER_ENCODER: Optional[DocumentEncoder] = None


def install_encoder(encoder: DocumentEncoder) -> None:
    """Make ``encoder`` the one ``encode_in_worker`` uses (before forking the workers)."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def installed_encoder() -> Optional[DocumentEncoder]:
    """The encoder installed in this process (inherited through fork), or None."""
    return _WORKER_ENCODER


def init_spawned_worker(config: EncoderConfig) -> None:
    """Pool initializer where workers are spawned, not forked: rebuild the encoder."""
    install_encoder(build_encoder(config))


def encode_in_worker(batch: LineBatch) -> EncodedBatch:
    """Pool task: encode one batch with the installed encoder."""
    return _WORKER_ENCODER.encode_batch(batch)
