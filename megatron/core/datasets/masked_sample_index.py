"""The sample index of the masked (BERT / T5) datasets, built as Megatron-LM's
``helpers.build_mapping`` builds it, so the same corpus, seed and flags give the same rows.

A row is ``(first_sentence, end_sentence_exclusive, target_length)``. Sentences of each
usable document are packed greedily: a sample closes when it has reached its target
length, holds at least ``min_sentences`` and more than one sentence is left in the
document, or when the document ends. Target lengths are ``max_length``, or with
probability ~``short_sequence_probability`` (1 in round(1/p) raw 32-bit Mersenne Twister
draws, seeded with the seed) a random ``2 + r % (max_length - 1)``. The rows are then
shuffled by Fisher-Yates with the 64-bit Mersenne Twister seeded with seed + 1.

``numpy.random.RandomState`` is MT19937 with the reference seeding, so its full-range
uint32 draws are exactly ``std::mt19937``'s; numpy has no MT19937-64, so ``MT19937_64``
implements it here (the C++ standard's engine; tested against its required 10000th value).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy

# Documents of several sentences that hold a sentence longer than this are skipped.
LONG_SENTENCE_LEN = 512

_N, _M = 312, 156
_MATRIX_A = numpy.uint64(0xB5026F5AA96619E9)
_UPPER = numpy.uint64(0xFFFFFFFF80000000)
_LOWER = numpy.uint64(0x7FFFFFFF)
_MASK64 = (1 << 64) - 1


class MT19937_64:
    """The 64-bit Mersenne Twister (``std::mt19937_64``): ``draws(n)`` -> uint64[n]."""

    def __init__(self, seed: int):
        state = [seed & _MASK64]
        for i in range(1, _N):
            prev = state[-1]
            state.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & _MASK64)
        self._state = numpy.array(state, dtype=numpy.uint64)
        self._next = _N  # a twist is due before the first draw

    @staticmethod
    def _mix(upper: numpy.ndarray, lower: numpy.ndarray, far: numpy.ndarray) -> numpy.ndarray:
        y = (upper & _UPPER) | (lower & _LOWER)
        odd = (y & numpy.uint64(1)).astype(bool)
        return far ^ (y >> numpy.uint64(1)) ^ numpy.where(odd, _MATRIX_A, numpy.uint64(0))

    def _twist(self) -> None:
        # Three vectorized pieces, each reading only values the sequential recurrence
        # would have seen at that point (old ones ahead, new ones wrapped around).
        mt = self._state
        mt[: _N - _M] = self._mix(mt[: _N - _M], mt[1 : _N - _M + 1], mt[_M:])
        mt[_N - _M : _N - 1] = self._mix(mt[_N - _M : _N - 1], mt[_N - _M + 1 :], mt[: _M - 1])
        mt[_N - 1 :] = self._mix(mt[_N - 1 :], mt[:1], mt[_M - 1 : _M])
        self._next = 0

    @staticmethod
    def _temper(x: numpy.ndarray) -> numpy.ndarray:
        x = x ^ ((x >> numpy.uint64(29)) & numpy.uint64(0x5555555555555555))
        x = x ^ ((x << numpy.uint64(17)) & numpy.uint64(0x71D67FFFEDA60000))
        x = x ^ ((x << numpy.uint64(37)) & numpy.uint64(0xFFF7EEE000000000))
        return x ^ (x >> numpy.uint64(43))

    def draws(self, count: int) -> numpy.ndarray:
        out = numpy.empty(count, dtype=numpy.uint64)
        filled = 0
        while filled < count:
            if self._next == _N:
                self._twist()
            take = min(count - filled, _N - self._next)
            out[filled : filled + take] = self._temper(self._state[self._next : self._next + take])
            self._next += take
            filled += take
        return out


class _MT19937Stream:
    """Raw 32-bit ``std::mt19937(seed)`` draws, one at a time, read from numpy in blocks."""

    _BLOCK = 4096

    def __init__(self, seed: int):
        self._state = numpy.random.RandomState(seed)
        self._block = numpy.empty(0, dtype=numpy.uint32)
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._block):
            self._block = self._state.randint(0, 2**32, size=self._BLOCK, dtype=numpy.uint32)
            self._pos = 0
        self._pos += 1
        return int(self._block[self._pos - 1])


def _short_sequence_ratio(probability: float) -> int:
    if probability == 0:
        # 1/0 converted to int32 in the compiled helper is INT32_MIN on x86-64, i.e. 2^31
        # as the unsigned modulus: a draw is still made for every sample, and it is
        # practically never short.
        return 2**31
    # C's round() takes halves away from zero (Python's round() would take them to even).
    return int(math.floor(1.0 / probability + 0.5))


def _target_length(ratio: int, max_length: int, draws: _MT19937Stream) -> int:
    r = draws.next()
    if r % ratio == 0:
        return 2 + r % (max_length - 1)
    return max_length


def _usable(lengths: numpy.ndarray, first: int, last: int, min_sentences: int) -> bool:
    count = last - first
    if count < min_sentences:
        return False
    return count == 1 or int(lengths[first:last].max()) <= LONG_SENTENCE_LEN


def build_sample_index(
    document_boundaries: numpy.ndarray,
    sentence_lengths: numpy.ndarray,
    num_epochs: int,
    max_num_samples: Optional[int],
    max_length: int,
    short_sequence_probability: float,
    seed: int,
    min_sentences: int,
) -> numpy.ndarray:
    """The shuffled sample index, uint32 [n, 3] (uint64 for more than 2^32 sentences).

    ``document_boundaries`` [D + 1]: document d holds sentences [b[d], b[d+1]).
    Epochs repeat until ``max_num_samples`` rows exist (checked at each epoch's start, so
    the last epoch is complete) or ``num_epochs`` ran.
    """
    if max_length < 2:
        raise ValueError(f"the sequence length leaves {max_length} tokens for text; it must leave at least 2")
    limit = numpy.iinfo(numpy.int64).max - 1 if max_num_samples is None else max_num_samples
    ratio = _short_sequence_ratio(short_sequence_probability)
    draws = _MT19937Stream(seed)
    boundaries = [int(b) for b in document_boundaries]
    usable = [
        (first, last) for first, last in zip(boundaries[:-1], boundaries[1:])
        if _usable(sentence_lengths, first, last, min_sentences)
    ]
    rows = []
    for _ in range(num_epochs):
        if len(rows) >= limit or not usable:
            break
        for first, last in usable:
            _pack_document(rows, sentence_lengths, first, last, min_sentences, ratio, max_length, draws)
    dtype = numpy.uint64 if len(sentence_lengths) > numpy.iinfo(numpy.uint32).max else numpy.uint32
    index = numpy.array(rows, dtype=dtype).reshape(-1, 3)
    _shuffle_rows(index, seed + 1)
    return index


def _pack_document(rows, lengths, first, last, min_sentences, ratio, max_length, draws) -> None:
    start = first
    remaining = last - first
    size = count = 0
    target = _target_length(ratio, max_length, draws)
    for sentence in range(first, last):
        size += int(lengths[sentence])
        count += 1
        remaining -= 1
        if (size >= target and remaining > 1 and count >= min_sentences) or remaining == 0:
            rows.append((start, sentence + 1, target))
            start = sentence + 1
            target = _target_length(ratio, max_length, draws)
            size = count = 0


def _shuffle_rows(index: numpy.ndarray, seed: int) -> None:
    n = index.shape[0]
    if n < 2:
        return
    draws = MT19937_64(seed).draws(n - 1)
    bounds = numpy.arange(n, 1, -1, dtype=numpy.uint64)  # i + 1 for i = n-1 .. 1
    picks = (draws % bounds).astype(numpy.int64)
    for i, j in zip(range(n - 1, 0, -1), picks.tolist()):
        if i != j:
            index[[i, j]] = index[[j, i]]
