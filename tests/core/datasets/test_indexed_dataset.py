"""IndexedDataset / IndexedDatasetBuilder: Megatron's byte format, round trips, validation, atomicity.

The reference for the format is written out by hand in this file (struct and the worked
example of megatron-facts section 2.2), not produced by the code under test.
"""

import os
import pickle
import struct

import numpy
import pytest

from megatron.core.datasets import indexed_dataset as ids
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

# megatron-facts 2.2: doc 0 = one sequence of 5 tokens, doc 1 = sequences of 3 and 4 tokens,
# vocab 50257 -> uint16 (code 8). 94 bytes: 34 header + 3*4 lengths + 3*8 pointers + 3*8 doc idx.
WORKED_EXAMPLE_IDX = (
    b"MMIDIDX\x00\x00"
    + struct.pack("<Q", 1)
    + struct.pack("<B", 8)
    + struct.pack("<Q", 3)
    + struct.pack("<Q", 3)
    + struct.pack("<3i", 5, 3, 4)
    + struct.pack("<3q", 0, 10, 16)
    + struct.pack("<3q", 0, 1, 3)
)
WORKED_EXAMPLE_TOKENS = [[101, 102, 103, 104, 105], [50256, 7, 8], [9, 10, 11, 50000]]


def _write_fixture(prefix, idx_bytes, tokens, dtype="<u2"):
    with open(prefix + ".idx", "wb") as f:
        f.write(idx_bytes)
    with open(prefix + ".bin", "wb") as f:
        f.write(numpy.concatenate([numpy.array(t, dtype=dtype) for t in tokens]).tobytes())


def _build(prefix, documents, dtype, multimodal=False, incremental=False):
    """documents: list of documents, each a list of sequences (lists of ids)."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=multimodal)
    for d, doc in enumerate(documents):
        if incremental:
            for s, seq in enumerate(doc):
                builder.add_item(numpy.array(seq, dtype=numpy.int64), mode=(d + s) % 3)
            builder.end_document()
        else:
            flat = [t for seq in doc for t in seq]
            modes = [(d + s) % 3 for s in range(len(doc))] if multimodal else None
            builder.add_document(flat, [len(seq) for seq in doc], modes=modes)
    builder.finalize(prefix + ".idx")


def _random_documents(rng, count, high):
    docs = []
    for _ in range(count):
        n_seq = int(rng.integers(0, 4))  # 0 sequences: an empty document
        docs.append([rng.integers(0, high, size=int(rng.integers(0, 9))).tolist() for _ in range(n_seq)])
    return docs


def test_worked_example_fixture_reads(tmp_path):
    prefix = str(tmp_path / "fixture")
    _write_fixture(prefix, WORKED_EXAMPLE_IDX, WORKED_EXAMPLE_TOKENS)
    assert len(WORKED_EXAMPLE_IDX) == 94
    ds = IndexedDataset(prefix)
    assert ds.dtype is numpy.uint16 and len(ds) == 3
    assert ds.sequence_lengths.tolist() == [5, 3, 4]
    assert ds.sequence_pointers.tolist() == [0, 10, 16]
    assert ds.document_indices.tolist() == [0, 1, 3]
    assert ds.sequence_modes is None
    assert [ds[i].tolist() for i in range(3)] == WORKED_EXAMPLE_TOKENS
    assert [s.tolist() for s in ds[1:3]] == WORKED_EXAMPLE_TOKENS[1:]
    assert ds.get(2, offset=1, length=2).tolist() == [10, 11]
    assert ds.get(0, offset=3).tolist() == [104, 105]
    assert ds[-1].tolist() == WORKED_EXAMPLE_TOKENS[-1]


@pytest.mark.parametrize("incremental", [False, True])
def test_writer_reproduces_worked_example_byte_for_byte(tmp_path, incremental):
    prefix = str(tmp_path / "written")
    dtype = DType.optimal_dtype(50257)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    if incremental:
        for seq in WORKED_EXAMPLE_TOKENS[:1]:
            builder.add_item(seq)
        builder.end_document()
        for seq in WORKED_EXAMPLE_TOKENS[1:]:
            builder.add_item(seq)
        builder.end_document()
    else:
        builder.add_document(WORKED_EXAMPLE_TOKENS[0], [5])
        builder.add_document(WORKED_EXAMPLE_TOKENS[1] + WORKED_EXAMPLE_TOKENS[2], [3, 4])
    builder.finalize(prefix + ".idx")
    assert open(prefix + ".idx", "rb").read() == WORKED_EXAMPLE_IDX
    expected_bin = numpy.array(sum(WORKED_EXAMPLE_TOKENS, []), dtype="<u2").tobytes()
    assert open(prefix + ".bin", "rb").read() == expected_bin and len(expected_bin) == 24


def test_dtype_codes_and_threshold():
    assert [DType.code_from_dtype(t) for t in (numpy.uint8, numpy.int8, numpy.int16, numpy.int32, numpy.int64,
                                               numpy.float64, numpy.float32, numpy.uint16)] == list(range(1, 9))
    assert DType.dtype_from_code(8) is numpy.uint16 and DType.size(8) == 2 and DType.size(numpy.int32) == 4
    assert DType.optimal_dtype(65499) is numpy.uint16
    assert DType.optimal_dtype(65500) is numpy.int32  # Megatron's threshold is 65500, not 65536
    assert DType.optimal_dtype(None) is numpy.int32
    with pytest.raises(ValueError, match="uint32"):
        DType.code_from_dtype(numpy.uint32)


@pytest.mark.parametrize("dtype,high", [(numpy.uint16, 65500), (numpy.int32, 2**31 - 1)])
@pytest.mark.parametrize("incremental", [False, True])
def test_round_trip(tmp_path, dtype, high, incremental):
    rng = numpy.random.default_rng(0)
    docs = _random_documents(rng, 40, high)
    docs[0], docs[7] = [], []  # empty documents at the start and inside
    prefix = str(tmp_path / "rt")
    _build(prefix, docs, dtype, incremental=incremental)
    sequences = [seq for doc in docs for seq in doc]
    for mmap in (True, False):
        ds = IndexedDataset(prefix, mmap=mmap)
        assert ds.dtype is dtype and len(ds) == len(sequences)
        assert [ds[i].tolist() for i in range(len(ds))] == sequences
        assert [s.tolist() for s in ds[3:17]] == sequences[3:17]
        assert ds[5:5] == []
        boundaries = numpy.cumsum([0] + [len(doc) for doc in docs]).tolist()
        assert ds.document_indices.tolist() == boundaries
        sizes = [len(s) for s in sequences]
        assert ds.sequence_pointers.tolist() == (numpy.cumsum([0] + sizes[:-1]) * numpy.dtype(dtype).itemsize).tolist()
        ds.index.verify_arrays()
    assert os.path.getsize(prefix + ".bin") == sum(len(s) for s in sequences) * numpy.dtype(dtype).itemsize


def test_get_bounds_and_pickle(tmp_path):
    prefix = str(tmp_path / "g")
    _build(prefix, [[[1, 2, 3]], [[4, 5]]], numpy.uint16)
    ds = IndexedDataset(prefix, mmap=False)
    with pytest.raises(IndexError, match="outside sequence 1"):
        ds.get(1, offset=1, length=2)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:2:2]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.mmap is False and clone[1].tolist() == [4, 5]


def test_multimodal_round_trip(tmp_path):
    rng = numpy.random.default_rng(1)
    docs = _random_documents(rng, 12, 1000)
    prefix = str(tmp_path / "mm")
    _build(prefix, docs, numpy.int32, multimodal=True)
    ds = IndexedDataset(prefix, multimodal=True)
    expected_modes = [(d + s) % 3 for d, doc in enumerate(docs) for s in range(len(doc))]
    assert ds.sequence_modes.tolist() == expected_modes
    seq, mode = ds[0]
    assert mode == expected_modes[0] and seq.tolist() == [s for doc in docs for s in doc][0]
    sequences, modes = ds[0:3]
    assert modes.tolist() == expected_modes[:3]
    n = len(ds)
    assert os.path.getsize(prefix + ".idx") == 34 + 12 * n + 8 * (len(docs) + 1) + n
    with pytest.raises(ValueError, match="multimodal=True"):
        IndexedDataset(prefix)


def test_add_index_concatenates(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    docs_a, docs_b = [[[1, 2], [3]], []], [[[4, 5, 6]], [[7], [8, 9]]]
    _build(a, docs_a, numpy.uint16)
    _build(b, docs_b, numpy.uint16)
    _build(str(tmp_path / "direct"), docs_a + docs_b, numpy.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=numpy.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(str(tmp_path / "merged.idx"))
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"merged{ext}", "rb").read() == open(tmp_path / f"direct{ext}", "rb").read()
    _build(str(tmp_path / "wide"), docs_b, numpy.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "bad.bin"), dtype=numpy.uint16)
    with pytest.raises(ValueError, match="int32"):
        builder.add_index(str(tmp_path / "wide"))
    builder.abort()


def test_token_ids_must_fit_dtype(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "o.bin"), dtype=numpy.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_item(numpy.array([1, 70000]))
    with pytest.raises(ValueError, match="lengths sum to 3"):
        builder.add_document([1, 2], [3])
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_outputs_appear_only_at_finalize(tmp_path, monkeypatch):
    prefix = str(tmp_path / "atomic")
    _build(prefix, [[[1, 2, 3]]], numpy.uint16)  # an old, valid pair
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.add_document([9, 9, 9, 9], [4])
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]  # the old pair is untouched while writing
    assert any(".tmp." in name for name in os.listdir(tmp_path))

    real_replace = os.replace

    def crash_on_idx(src, dst):
        if dst.endswith(".idx"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ids.os, "replace", crash_on_idx)
    with pytest.raises(OSError, match="simulated"):
        builder.finalize(prefix + ".idx")
    # The new .bin is in place but the old .idx was removed first: no valid-looking mismatched pair.
    assert not IndexedDataset.exists(prefix)
    assert not any(".tmp." in name for name in os.listdir(tmp_path))

    monkeypatch.setattr(ids.os, "replace", real_replace)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.add_document([9, 9, 9, 9], [4])
    builder.finalize(prefix + ".idx")
    assert IndexedDataset(prefix)[0].tolist() == [9, 9, 9, 9]
    assert sorted(os.listdir(tmp_path)) == ["atomic.bin", "atomic.idx"]


# --- validation on open: every error names the file and, for sizes, expected and actual ---------------

def _corrupt(tmp_path, idx_bytes, tokens=WORKED_EXAMPLE_TOKENS):
    prefix = str(tmp_path / "bad")
    _write_fixture(prefix, idx_bytes, tokens)
    return prefix


def _patched(offset, packed):
    return WORKED_EXAMPLE_IDX[:offset] + packed + WORKED_EXAMPLE_IDX[offset + len(packed):]


@pytest.mark.parametrize("idx_bytes,pattern", [
    (b"NOTANIDX!" + WORKED_EXAMPLE_IDX[9:], r"bad magic b'NOTANIDX!', expected b'MMIDIDX"),
    (b"TNTIDX\x00\x00" + WORKED_EXAMPLE_IDX[8:], r"lazy/cached"),
    (_patched(9, struct.pack("<Q", 2)), r"index version 2 is not supported, expected 1"),
    (_patched(17, struct.pack("<B", 9)), r"dtype code 9 is unknown"),
    (_patched(17, struct.pack("<B", 0)), r"dtype code 0 is unknown"),
    (WORKED_EXAMPLE_IDX[:5], r"truncated index: the header needs 34 bytes, the file has 5"),
    (WORKED_EXAMPLE_IDX[:20], r"truncated index: the header needs 34 bytes, the file has 20"),
    (WORKED_EXAMPLE_IDX[:90], r"truncated index: expected 94 bytes for 3 sequences and 2 documents, the file has 90"),
    (WORKED_EXAMPLE_IDX + b"\x00" * 5, r"over-long index: expected 94 bytes .* the file has 99"),
    (_patched(26, struct.pack("<Q", 0)) , r"document count is 0"),
    (_patched(34 + 36 + 16, struct.pack("<q", 2)), r"inconsistent counts: document_indices\[-1\] is 2, expected the sequence count 3"),
    (_patched(34 + 36, struct.pack("<q", 1)), r"document_indices\[0\] is 1, expected 0"),
])
def test_bad_index_errors(tmp_path, idx_bytes, pattern):
    prefix = _corrupt(tmp_path, idx_bytes)
    with pytest.raises(ValueError, match=pattern) as err:
        IndexedDataset(prefix)
    assert prefix + ".idx" in str(err.value)


@pytest.mark.parametrize("tokens,pattern", [
    (WORKED_EXAMPLE_TOKENS[:-1] + [[9, 10, 11]], r"truncated data file: expected 24 bytes .* the file has 22"),
    (WORKED_EXAMPLE_TOKENS + [[1]], r"over-long data file: expected 24 bytes .* the file has 26"),
])
def test_bad_bin_size_errors(tmp_path, tokens, pattern):
    prefix = _corrupt(tmp_path, WORKED_EXAMPLE_IDX, tokens)
    with pytest.raises(ValueError, match=pattern) as err:
        IndexedDataset(prefix)
    assert prefix + ".bin" in str(err.value) and prefix + ".idx" in str(err.value)


def test_missing_files_and_full_checks(tmp_path):
    prefix = _corrupt(tmp_path, WORKED_EXAMPLE_IDX)
    os.remove(prefix + ".bin")
    assert not IndexedDataset.exists(prefix)
    with pytest.raises(FileNotFoundError, match=r"data file .*bad\.bin does not exist"):
        IndexedDataset(prefix)
    # Pointer 1 off by 2 bytes: the full (vectorized) check on open names the entry and the file.
    prefix = _corrupt(tmp_path, _patched(34 + 12 + 8, struct.pack("<q", 12)))
    with pytest.raises(ValueError, match=r"bad\.idx: sequence_pointers\[1\] is 12, expected 10"):
        IndexedDataset(prefix)


def test_decreasing_document_boundaries_fail_on_open(tmp_path):
    # Three documents [0, 2, 1, 3]: the boundary 1 after 2 would make a negative-length document.
    idx = (WORKED_EXAMPLE_IDX[:26] + struct.pack("<Q", 4) + WORKED_EXAMPLE_IDX[34:34 + 36]
           + struct.pack("<4q", 0, 2, 1, 3))
    prefix = _corrupt(tmp_path, idx)
    with pytest.raises(ValueError, match=r"bad\.idx: document_indices\[2\] = 1 is smaller than"):
        IndexedDataset(prefix)
