"""GPT index construction against a plain re-statement of Megatron's loops."""

import numpy
import pytest

from megatron.core.datasets.gpt_indices import build_gpt_indices, build_sample_index
from tests.core.datasets.reference_megatron import reference_gpt_indices, reference_sample_index

CASES = [
    # (num_docs, max_len, seq_length, num_samples, seed)
    (50, 40, 16, None, 1),      # one epoch
    (50, 40, 16, 100, 2),       # within the first epoch
    (20, 30, 8, 150, 3),        # several epochs, last one kept together or separate
    (20, 30, 8, 200, 4),
    (7, 12, 5, 61, 5),
    (30, 3, 4, 500, 6),         # documents shorter than a sample
    (3, 200, 64, 40, 7),        # documents longer than a sample
    (1, 50, 7, 30, 8),          # a single document
]


def _random_sizes(num_docs, max_len, seed):
    return numpy.random.RandomState(seed + 100).randint(1, max_len + 1, size=num_docs).astype(numpy.int32)


@pytest.mark.parametrize("num_docs,max_len,seq,num_samples,seed", CASES)
def test_indices_equal_reference(num_docs, max_len, seq, num_samples, seed):
    sizes = _random_sizes(num_docs, max_len, seed)
    documents = numpy.arange(num_docs // 5, num_docs, dtype=numpy.int32) if num_docs > 5 else numpy.arange(num_docs, dtype=numpy.int32)
    doc, sample, shuffle = build_gpt_indices(sizes, documents, seq, num_samples, seed)
    ref_doc, ref_sample, ref_shuffle, _, _ = reference_gpt_indices(sizes, documents, seq, num_samples, seed)
    numpy.testing.assert_array_equal(doc, ref_doc)
    assert doc.dtype == numpy.int32
    numpy.testing.assert_array_equal(sample, ref_sample)
    assert sample.dtype == numpy.int32
    numpy.testing.assert_array_equal(shuffle, ref_shuffle)
    assert shuffle.dtype == numpy.uint32
    if num_samples is not None:
        assert len(shuffle) >= num_samples


def test_cases_cover_separate_and_joined_final_epochs():
    seen = set()
    for num_docs, max_len, seq, num_samples, seed in CASES:
        sizes = _random_sizes(num_docs, max_len, seed)
        docs = numpy.arange(num_docs // 5, num_docs, dtype=numpy.int32) if num_docs > 5 else numpy.arange(num_docs, dtype=numpy.int32)
        _, _, _, epochs, separate = reference_gpt_indices(sizes, docs, seq, num_samples, seed)
        seen.add((epochs > 1, separate))
    assert {(True, True), (True, False), (False, False)} <= seen


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_index_variants(extra, drop_last):
    rng = numpy.random.RandomState(11)
    for trial in range(20):
        sizes = rng.randint(1, 25, size=rng.randint(1, 30)).astype(numpy.int32)
        doc_idx = rng.permutation(numpy.tile(numpy.arange(len(sizes), dtype=numpy.int32), 2))
        seq = int(rng.randint(1, 20))
        tokens_per_epoch = int(sizes.sum())
        ref = reference_sample_index(sizes, doc_idx, seq, 2, tokens_per_epoch, drop_last, extra)
        got = build_sample_index(sizes, doc_idx, seq, ref.shape[0] - 1, bool(extra))
        numpy.testing.assert_array_equal(got, ref, err_msg=f"trial {trial}")
