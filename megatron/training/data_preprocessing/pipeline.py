"""The ordered encoding pipeline: input lines -> batches -> workers -> one dataset per json key.

Batches go to a pool of --workers processes through an ordered ``imap``, so the output bytes
do not depend on the number of workers; with one worker the batches are encoded in this
process (no pool, no copies). Workers are forked where the OS allows it, inheriting the
tokenizer already built here; elsewhere they are spawned and rebuild it.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, TextIO

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path
from megatron.training.data_preprocessing.bad_lines import BadLinePolicy
from megatron.training.data_preprocessing.encoder import (
    DocumentEncoder,
    EncodedBatch,
    EncoderConfig,
    LineBatch,
    encode_in_worker,
    init_spawned_worker,
    install_encoder,
)
from megatron.training.data_preprocessing.json_lines import numbered_lines

# A batch is the unit sent to a worker: big enough that pickling costs little, small enough
# that the workers stay balanced near the end of the input.
MAX_BATCH_LINES = 1024
MAX_BATCH_BYTES = 256 * 1024


def dataset_prefix(output_prefix: str, key: str, level: str) -> str:
    """Megatron's output name: ``<output-prefix>_<key>_<document|sentence>``."""
    return f"{output_prefix}_{key}_{level}"


@dataclass
class LineSelection:
    """The raw lines (0-based over all input files, blank lines included) of one partition.

    Round-robin (line ``i`` goes to partition ``i % count``) unless ``sequential_size`` is set;
    then partition ``k`` holds lines ``[k * size, (k + 1) * size)`` (--keep-sequential-samples).
    """

    index: int = 0
    count: int = 1
    sequential_size: Optional[int] = None

    def keeps(self, line: int) -> bool:
        if self.count == 1:
            return True
        if self.sequential_size is not None:
            return line // self.sequential_size == self.index
        return line % self.count == self.index

    def past_end(self, line: int) -> bool:
        """True once no later line can belong to this partition."""
        return self.sequential_size is not None and line >= (self.index + 1) * self.sequential_size


@dataclass
class EncodeStats:
    """Counts of one encoding run."""

    documents: int = 0
    bytes_read: int = 0
    blank_lines: int = 0
    rejected: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def line_batches(paths: Sequence[str], selection: LineSelection, stats: EncodeStats,
                 max_lines: Optional[int] = None) -> Iterator[LineBatch]:
    """The selected non-blank lines, grouped into batches that never span two files."""
    lines: List = []
    size, file_index, taken = 0, 0, 0
    for line_number, (index, lineno, raw) in enumerate(numbered_lines(paths)):
        if selection.past_end(line_number) or (max_lines is not None and taken >= max_lines):
            break
        if not selection.keeps(line_number):
            continue
        if raw.isspace() or not raw:
            stats.blank_lines += 1
            continue
        if lines and (index != file_index or len(lines) >= MAX_BATCH_LINES or size >= MAX_BATCH_BYTES):
            yield LineBatch(file_index, lines)
            lines, size = [], 0
        file_index = index
        lines.append((lineno, raw))
        size += len(raw)
        taken += 1
    if lines:
        yield LineBatch(file_index, lines)


class Progress:
    """Megatron's progress line on stderr every ``log_interval`` documents."""

    def __init__(self, log_interval: int, stream: Optional[TextIO] = None):
        self.log_interval = max(1, log_interval)
        self.stream = stream
        self.start = time.perf_counter()
        self.documents = 0
        self.bytes = 0
        self._next = self.log_interval

    def add(self, documents: int, nbytes: int) -> None:
        self.documents += documents
        self.bytes += nbytes
        while self.documents >= self._next:
            self._print(self._next)
            self._next += self.log_interval

    def _print(self, count: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(f"Processed {count} documents ({count / elapsed:.2f} docs/s, "
              f"{self.bytes / elapsed / 1024 / 1024:.2f} MB/s).", file=self.stream or sys.stderr, flush=True)


def encode_batches(batches: Iterable[LineBatch], encoder: DocumentEncoder, workers: int,
                   config: Optional[EncoderConfig] = None) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, from ``workers`` processes (this one if ``workers`` is 1)."""
    if workers <= 1:
        for batch in batches:
            yield encoder.encode_batch(batch)
        return
    if "fork" in multiprocessing.get_all_start_methods():
        install_encoder(encoder)
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        if config is None:
            raise ValueError("spawned workers need the EncoderConfig to rebuild the tokenizer")
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_spawned_worker,
                                                         initargs=(config,))
    finished = False
    try:
        yield from pool.imap(encode_in_worker, batches, chunksize=1)
        finished = True
    finally:
        if finished:
            # Let the workers exit by themselves. terminate() after close() races with
            # workers leaving on their own: it can block forever on the task queue's lock
            # (about one run in four with --partitions 2 and several workers each).
            pool.close()
        else:
            pool.terminate()
        pool.join()


def encode_to_datasets(paths: Sequence[str], output_prefix: str, level: str, encoder: DocumentEncoder,
                       workers: int, policy: BadLinePolicy, log_interval: int = 1000,
                       selection: Optional[LineSelection] = None, config: Optional[EncoderConfig] = None,
                       max_lines: Optional[int] = None, write: bool = True) -> EncodeStats:
    """Encode the selected lines of ``paths`` into ``<output_prefix>_<key>_<level>`` datasets.

    With ``write`` False nothing is written (timing runs). On any error the partial outputs
    are discarded and the error propagates; on success every dataset is published atomically.
    """
    stats = EncodeStats(tokens={key: 0 for key in encoder.json_keys})
    builders: Dict[str, IndexedDatasetBuilder] = {}
    if write:
        for key in encoder.json_keys:
            builders[key] = IndexedDatasetBuilder(get_bin_path(dataset_prefix(output_prefix, key, level)),
                                                  dtype=encoder.dtype.type)
    progress = Progress(log_interval)
    try:
        batches = line_batches(paths, selection or LineSelection(), stats, max_lines)
        # closing(): stop the pool as soon as the loop raises, not when the traceback is freed.
        with closing(encode_batches(batches, encoder, workers, config)) as results:
            for result in results:
                policy.handle(paths[result.file_index], result.bad_lines)
                stats.rejected += len(result.bad_lines)
                for key, part in result.keys.items():
                    stats.tokens[key] += int(part.tokens.size)
                    if write:
                        builders[key].add_encoded_documents(part.tokens.tobytes(), part.sequence_lengths,
                                                            part.document_ends)
                progress.add(result.documents, result.bytes_read)
        for key, builder in builders.items():
            builder.finalize(get_idx_path(dataset_prefix(output_prefix, key, level)))
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    stats.documents, stats.bytes_read = progress.documents, progress.bytes
    stats.seconds = time.perf_counter() - progress.start
    return stats
