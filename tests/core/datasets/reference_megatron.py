"""Straightforward re-statements of Megatron's index loops (from megatron-facts section 3),
written as C++-style while loops, to test the vectorized builders against."""

from __future__ import annotations

import numpy


def reference_sample_index(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, drop_last=True, extra=1):
    if drop_last:
        num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    else:
        num_samples = int(numpy.ceil(numpy.float32(num_epochs * tokens_per_epoch - extra) / numpy.float32(seq_length)))
    out = numpy.zeros((num_samples + 1, 2), dtype=numpy.int64)
    sample = 0
    doc_pos = 0
    offset = 0
    out[sample] = (doc_pos, offset)
    sample += 1
    while sample <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_pos]]) - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - extra
                remaining = 0
            else:
                if doc_pos == len(doc_idx) - 1:
                    assert sample == num_samples
                    offset = int(sizes[doc_idx[doc_pos]]) - extra
                    break
                doc_pos += 1
                offset = 0
        out[sample] = (doc_pos, offset)
        sample += 1
    return out


def reference_gpt_indices(sizes, documents, seq_length, num_samples, seed, drop_last=True, extra=1):
    """Megatron's GPTDataset index construction, step by step."""
    tokens_per_epoch = int(sum(int(sizes[d]) for d in documents))
    num_epochs = 1
    if num_samples is not None:
        tokens = tokens_per_epoch
        while tokens < num_samples * seq_length + extra:
            num_epochs += 1
            tokens += tokens_per_epoch
    separate = False
    if num_epochs > 1:
        before = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final = num_samples - before
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate = from_final < int(0.80 * per_epoch)
    rng = numpy.random.RandomState(seed)

    def doc_index(epochs):
        idx = numpy.array([d for _ in range(epochs) for d in documents], dtype=numpy.int32)
        rng.shuffle(idx)
        return idx

    if separate:
        document_index = numpy.concatenate([doc_index(num_epochs - 1), doc_index(1)])
    else:
        document_index = doc_index(num_epochs)
    sample_index = reference_sample_index(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                          drop_last, extra)
    total = sample_index.shape[0] - 1
    if separate:
        first = numpy.arange(0, before, dtype=numpy.uint32)
        rng.shuffle(first)
        last = numpy.arange(before, total, dtype=numpy.uint32)
        rng.shuffle(last)
        shuffle_index = numpy.concatenate([first, last])
    else:
        shuffle_index = numpy.arange(0, total, dtype=numpy.uint32)
        rng.shuffle(shuffle_index)
    return document_index, sample_index, shuffle_index, num_epochs, separate


def reference_blending(weights, size):
    """Megatron's build_blending_indices loop."""
    n = len(weights)
    counts = [0] * n
    dataset_index = numpy.zeros(size, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(size, dtype=numpy.int64)
    for k in range(size):
        kd = max(float(k), 1.0)
        argmax = 0
        best = weights[0] * kd - float(counts[0])
        for i in range(1, n):
            err = weights[i] * kd - float(counts[i])
            if err > best:
                argmax, best = i, err
        dataset_index[k] = argmax
        dataset_sample_index[k] = counts[argmax]
        counts[argmax] += 1
    return dataset_index, dataset_sample_index


def reference_exhaustive_blending(sizes):
    """Megatron's build_exhaustive_blending_indices loop."""
    total = sum(sizes)
    weights = [s / float(total) for s in sizes]
    counts = [0] * len(sizes)
    unspent = [i for i, s in enumerate(sizes) if s > 0]
    dataset_index = numpy.zeros(total, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(total, dtype=numpy.int64)
    k = 0
    while unspent:
        kd = max(float(k), 1.0)
        argmax, best = -1, None
        for i in unspent:
            err = weights[i] * kd - counts[i]
            if best is None or err > best:
                argmax, best = i, err
        dataset_index[k] = argmax
        dataset_sample_index[k] = counts[argmax]
        counts[argmax] += 1
        if counts[argmax] == sizes[argmax]:
            unspent.remove(argmax)
        k += 1
    return dataset_index, dataset_sample_index
