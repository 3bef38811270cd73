"""Train/valid/test splits of a low-level dataset (megatron-facts section 3.2).

A split string such as ``"969, 30, 1"`` becomes normalized weights, then cumulative
bookends per split, then a contiguous range of elements of each low-level dataset.
The arithmetic follows Megatron-Core's so that the bookends (which are hashed into the
cache descriptions) come out as the same floats.
"""

from __future__ import annotations

import enum
import re
from typing import List, Optional, Sequence, Tuple

import numpy


class Split(enum.Enum):
    """The three splits, in Megatron's order."""

    train = 0
    valid = 1
    test = 2


def normalize(weights: Sequence[float]) -> List[float]:
    """Weights divided by their sum, as float64."""
    w = numpy.array(weights, dtype=numpy.float64)
    total = numpy.sum(w)
    if not total > 0:
        raise ValueError(f"weights {list(weights)} must have a positive sum")
    return (w / total).tolist()


def parse_and_normalize_split(split: str) -> List[float]:
    """``"949,50,1"`` -> ``[0.949, 0.05, 0.001]``.

    Every ``[.0-9]+`` group is a number; missing trailing splits count 0.
    """
    numbers = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if len(numbers) > len(Split) or not numbers:
        raise ValueError(
            f"--split {split!r} must hold 1 to {len(Split)} numbers (train, valid, test), "
            "e.g. --split 969,30,1"
        )
    numbers = numbers + [0.0] * (len(Split) - len(numbers))
    if sum(numbers) <= 0:
        raise ValueError(f"--split {split!r} has no positive part; give e.g. --split 969,30,1")
    return normalize(numbers)


def _bookends(vector: Sequence[float]) -> List[Tuple[float, float]]:
    # Start from the int 0 (not 0.0): the first bookend prints as 0 in the cache description.
    cumulative = [0]
    for weight in vector:
        cumulative.append(cumulative[-1] + weight)
    return list(zip(cumulative[:-1], cumulative[1:]))


def convert_split_vector_to_split_matrix(
    vector_a: Sequence[float], vector_b: Optional[Sequence[float]] = None
) -> List[Optional[Tuple[float, float]]]:
    """Per split, the overlap of the bookends of ``vector_a`` and ``vector_b`` (or None).

    With one vector: ``[0.9, 0.09, 0.01]`` -> ``[(0, 0.9), (0.9, 0.99), (0.99, 1.0)]``;
    an empty range becomes None and that split is not built.
    """
    bookends_a = _bookends(vector_a)
    bookends_b = _bookends(vector_a if vector_b is None else vector_b)
    matrix: List[Optional[Tuple[float, float]]] = []
    for (a0, a1), (b0, b1) in zip(bookends_a, bookends_b):
        low, high = max(a0, b0), min(a1, b1)
        matrix.append(None if high <= low else (low, high))
    return matrix


def split_element_range(bookend: Tuple[float, float], num_elements: int) -> numpy.ndarray:
    """The int32 ids ``[round(b0 * N), round(b1 * N))`` of one split of N elements."""
    begin = int(round(bookend[0] * float(num_elements)))
    end = int(round(bookend[1] * float(num_elements)))
    return numpy.arange(begin, end, dtype=numpy.int32)
