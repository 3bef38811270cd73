"""Which dataset, and which of its samples, fills each position of a blend (section 3.4).

Greedy, error-minimizing interleave: position k goes to the dataset with the largest
``weight_i * max(k, 1) - count_i`` (ties to the lowest index). The rule is sequential, so
it runs as a tight loop: compiled (``blending_kernel``, ~100 M positions/s) where a C
compiler is available, else over plain Python floats (~1-3 M positions/s). Both use the
same IEEE doubles as Megatron's compiled helper, so the choices agree bit for bit.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy

from megatron.core.datasets import blending_kernel

BACKENDS = ("auto", "python")


def _check_count(num_datasets: int) -> None:
    if not 0 < num_datasets < 32767:
        raise ValueError(f"a blend holds 1 to 32766 datasets, got {num_datasets}; split the --data-path blend")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")


def build_blending_indices(weights: Sequence[float], size: int,
                           backend: str = "auto") -> Tuple[numpy.ndarray, numpy.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for normalized ``weights``.

    ``backend`` "python" forces the reference loop; "auto" uses the compiled one if it loads.
    """
    _check_count(len(weights))
    _check_backend(backend)
    if backend == "auto" and len(weights) > 1:
        compiled = blending_kernel.blend(weights, size)
        if compiled is not None:
            return compiled
    w = [float(x) for x in weights]
    choice = numpy.empty(size, dtype=numpy.int16)
    sample = numpy.empty(size, dtype=numpy.int64)
    if len(w) == 1:
        choice[:] = 0
        sample[:] = numpy.arange(size)
        return choice, sample
    picks = _greedy_two(w, size) if len(w) == 2 else _greedy_many(w, size)
    choice[:] = picks
    sample[:] = _running_counts(choice, len(w))
    return choice, sample


def _greedy_two(w, size):
    w0, w1 = w
    c0 = c1 = 0.0
    out = bytearray(size)
    for k in range(size):
        kd = float(k) if k > 1 else 1.0
        if w1 * kd - c1 > w0 * kd - c0:
            out[k] = 1
            c1 += 1.0
        else:
            c0 += 1.0
    return numpy.frombuffer(bytes(out), dtype=numpy.uint8)


def _greedy_many(w, size):
    n = len(w)
    counts = [0.0] * n
    rest = range(1, n)
    out = numpy.empty(size, dtype=numpy.int16)
    picks = [0] * size
    for k in range(size):
        kd = float(k) if k > 1 else 1.0
        best, best_err = 0, w[0] * kd - counts[0]
        for i in rest:
            err = w[i] * kd - counts[i]
            if err > best_err:
                best, best_err = i, err
        picks[k] = best
        counts[best] += 1.0
    out[:] = picks
    return out


def _running_counts(choice: numpy.ndarray, num_datasets: int) -> numpy.ndarray:
    """For each position, how many earlier positions chose the same dataset."""
    out = numpy.empty(len(choice), dtype=numpy.int64)
    for i in range(num_datasets):
        where = numpy.flatnonzero(choice == i)
        out[where] = numpy.arange(len(where), dtype=numpy.int64)
    return out


def build_exhaustive_blending_indices(sizes: Sequence[int],
                                      backend: str = "auto") -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Indices drawing exactly ``sizes[i]`` samples from dataset i (the blend of an
    unweighted list with no requested size): the same greedy rule with weights
    ``sizes / sum(sizes)``, skipping datasets already used up."""
    _check_count(len(sizes))
    _check_backend(backend)
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    w = [s / float(total) for s in sizes] if total else [0.0] * len(sizes)
    if backend == "auto" and total:
        compiled = blending_kernel.blend_exhaustive(w, sizes)
        if compiled is not None:
            return compiled
    counts = [0] * len(sizes)
    live = [i for i, s in enumerate(sizes) if s > 0]
    picks = [0] * total
    for k in range(total):
        kd = float(k) if k > 1 else 1.0
        best, best_err = -1, None
        for i in live:
            err = w[i] * kd - counts[i]
            if best_err is None or err > best_err:
                best, best_err = i, err
        picks[k] = best
        counts[best] += 1
        if counts[best] == sizes[best]:
            live.remove(best)
    choice = numpy.array(picks, dtype=numpy.int16)
    return choice, _running_counts(choice, len(sizes))
