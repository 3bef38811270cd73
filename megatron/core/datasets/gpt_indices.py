"""Document, sample and shuffle indices of a GPT dataset (megatron-facts section 3.3).

Megatron builds the sample index with a compiled loop that walks the shuffled documents
``seq_length (+1)`` tokens at a time. Here the same boundaries come from arithmetic: the
start of sample i is global token ``i * seq_length`` of the concatenated documents, found
with a binary search over the cumulative document lengths, in bounded chunks.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy

_INT32_MAX = numpy.iinfo(numpy.int32).max
_CHUNK = 1 << 22


def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], sequence_length: int,
                      add_extra_token: bool = True) -> int:
    """Smallest E with ``E * tokens_per_epoch >= num_samples * S + extra`` (1 when None)."""
    if num_samples is None:
        return 1
    needed = num_samples * sequence_length + int(add_extra_token)
    return max(1, -(-needed // tokens_per_epoch))


def separate_final_epoch_needed(tokens_per_epoch: int, num_epochs: int, num_samples: Optional[int],
                                sequence_length: int, add_extra_token: bool = True) -> bool:
    """Whether the last epoch is shuffled on its own: it is used for < 80% of its samples."""
    if num_epochs == 1 or num_samples is None:
        return False
    extra = int(add_extra_token)
    before = ((num_epochs - 1) * tokens_per_epoch - extra) // sequence_length
    from_final = num_samples - before
    per_epoch = (tokens_per_epoch - extra) // sequence_length
    return from_final < int(0.80 * per_epoch)


def build_document_index(documents: numpy.ndarray, num_epochs: int, rng: numpy.random.RandomState,
                         separate_final_epoch: bool) -> numpy.ndarray:
    """``documents`` tiled ``num_epochs`` times and shuffled (int32, 1-D).

    With a separate final epoch, the first E-1 epochs are shuffled together, then the last.
    """
    if not separate_final_epoch or num_epochs == 1:
        index = numpy.tile(numpy.asarray(documents, dtype=numpy.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return numpy.concatenate((first, last))


def num_samples_in(num_epochs: int, tokens_per_epoch: int, sequence_length: int,
                   drop_last_partial_sequence: bool = True, add_extra_token: bool = True) -> int:
    """Samples the sample index holds: floor, or ceil to keep a final partial sample."""
    usable = num_epochs * tokens_per_epoch - int(add_extra_token)
    if drop_last_partial_sequence:
        return usable // sequence_length
    # Megatron divides in single precision here; do the same so the count agrees.
    return int(math.ceil(numpy.float32(usable) / numpy.float32(sequence_length)))


def build_sample_index(sequence_lengths: numpy.ndarray, document_index: numpy.ndarray, sequence_length: int,
                       num_samples: int, add_extra_token: bool = True) -> numpy.ndarray:
    """``[num_samples + 1, 2]`` rows (position in document_index, token offset) where samples begin.

    Row i locates global token ``i * S``; with the extra token that token is also the last
    (label-only) token of sample i - 1, so consecutive samples share it. Without it, a
    boundary at a document's end is recorded as (that document, its length). A row past the
    data (a kept partial sample) is (last document, its length - extra). Row 0 is (0, 0).
    dtype int32, or int64 when a position or length does not fit.
    """
    document_index = numpy.asarray(document_index)
    lengths = numpy.asarray(sequence_lengths)
    ends = lengths[document_index].astype(numpy.int64)
    numpy.cumsum(ends, out=ends)  # in place: one int64 per document position at peak
    big = max(len(document_index), int(lengths.max(initial=0))) > _INT32_MAX
    out = numpy.empty((num_samples + 1, 2), dtype=numpy.int64 if big else numpy.int32)
    side = "right" if add_extra_token else "left"
    last_pos = len(ends) - 1
    last_len = int(lengths[document_index[last_pos]]) if len(ends) else 0
    for begin in range(0, num_samples + 1, _CHUNK):
        stop = min(begin + _CHUNK, num_samples + 1)
        targets = numpy.arange(begin, stop, dtype=numpy.int64) * sequence_length
        positions = numpy.searchsorted(ends, targets, side=side)
        past = positions > last_pos
        positions[past] = last_pos
        doc_start = ends[positions] - lengths[document_index[positions]]
        offsets = targets - doc_start
        offsets[past] = last_len - int(add_extra_token)
        out[begin:stop, 0] = positions
        out[begin:stop, 1] = offsets
    out[0] = (0, 0)
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: numpy.random.RandomState) -> numpy.ndarray:
    """A shuffled ``[0, num_samples)``, then (if ``total_size`` is larger) a shuffled
    ``[num_samples, total_size)``; uint32, or int64 past 2**32 - 2."""
    dtype = numpy.int64 if total_size >= numpy.iinfo(numpy.uint32).max - 1 else numpy.uint32
    first = numpy.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = numpy.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return numpy.concatenate((first, last))


def build_gpt_indices(sequence_lengths: numpy.ndarray, documents: numpy.ndarray, sequence_length: int,
                      num_samples: Optional[int], seed: int, drop_last_partial_sequence: bool = True,
                      add_extra_token: bool = True) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(document_index, sample_index, shuffle_index) for ``num_samples`` samples (None: one
    epoch) of ``sequence_length`` tokens drawn from ``documents``, all shuffles drawn in
    Megatron's order from one ``RandomState(seed)``."""
    tokens_per_epoch = int(numpy.sum(numpy.asarray(sequence_lengths)[documents], dtype=numpy.int64))
    if tokens_per_epoch <= int(add_extra_token):
        raise ValueError(
            f"the split holds {tokens_per_epoch} tokens, too few for a sample; use more data or change --split"
        )
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, sequence_length, add_extra_token)
    separate = separate_final_epoch_needed(tokens_per_epoch, num_epochs, num_samples, sequence_length,
                                           add_extra_token)
    rng = numpy.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate)
    total = num_samples_in(num_epochs, tokens_per_epoch, sequence_length, drop_last_partial_sequence,
                           add_extra_token)
    sample_index = build_sample_index(sequence_lengths, document_index, sequence_length, total, add_extra_token)
    if separate:
        before = ((num_epochs - 1) * tokens_per_epoch - int(add_extra_token)) // sequence_length
        shuffle_index = build_shuffle_index(before, total, rng)
    else:
        shuffle_index = build_shuffle_index(total, total, rng)
    return document_index, sample_index, shuffle_index
