"""tools/merge_datasets.py and tools/verify_dataset.py on small hand-built datasets."""

import json
import os
import struct

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tools import merge_datasets, verify_dataset


def _build(prefix, documents, dtype=numpy.uint16, multimodal=False):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    for d, doc in enumerate(documents):
        modes = [d % 2] * len(doc) if multimodal else None
        builder.add_document([t for seq in doc for t in seq], [len(seq) for seq in doc], modes=modes)
    builder.finalize(f"{prefix}.idx")


def _sequences(prefix, multimodal=False):
    ds = IndexedDataset(str(prefix), multimodal=multimodal)
    return [(ds[i][0] if multimodal else ds[i]).tolist() for i in range(len(ds))], ds.document_indices.tolist()


DOCS = {"b": [[[5, 6]], [[7], [8, 9]]], "a": [[[1, 2, 3]], []], "c": [[[10]]]}


def test_merge_in_name_order(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name, docs in DOCS.items():
        _build(tmp_path / "in" / name, docs)
    (tmp_path / "in" / "README.txt").write_text("not a dataset")
    assert merge_datasets.main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "m")]) == 0
    _build(tmp_path / "direct", DOCS["a"] + DOCS["b"] + DOCS["c"])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"direct{ext}").read_bytes()
    assert "merged 3 datasets" in capsys.readouterr().out


def test_merge_multimodal(tmp_path):
    (tmp_path / "in").mkdir()
    for name, docs in DOCS.items():
        _build(tmp_path / "in" / name, docs, numpy.int32, multimodal=True)
    assert merge_datasets.main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "m"),
                                "--multimodal"]) == 0
    ds = IndexedDataset(str(tmp_path / "m"), multimodal=True)
    assert ds.sequence_modes.tolist() == [0, 0, 1, 1, 0]
    assert _sequences(tmp_path / "m", True) == ([[1, 2, 3], [5, 6], [7], [8, 9], [10]], [0, 1, 1, 2, 4, 5])


@pytest.mark.parametrize("setup,message", [
    ("unpaired", "b.idx has no .bin beside it"),
    ("dtypes", "its dtype is int32, this dataset's is uint16"),
    ("empty", "holds no .bin/.idx pairs"),
    ("self", "is one of the inputs"),
])
def test_merge_errors(tmp_path, capsys, setup, message):
    (tmp_path / "in").mkdir()
    out = str(tmp_path / "m")
    if setup != "empty":
        _build(tmp_path / "in" / "a", DOCS["a"])
        _build(tmp_path / "in" / "b", DOCS["b"], numpy.int32 if setup == "dtypes" else numpy.uint16)
    if setup == "unpaired":
        os.remove(tmp_path / "in" / "b.bin")
    if setup == "self":
        out = str(tmp_path / "in" / "a")
    assert merge_datasets.main(["--input", str(tmp_path / "in"), "--output-prefix", out]) == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.idx") and not os.path.exists(tmp_path / "m.bin")


def test_verify_summary_and_vocab_bound(tmp_path, capsys):
    _build(tmp_path / "d", [[[1, 2, 3], [4]], [], [[50256, 7]]])
    assert verify_dataset.main([str(tmp_path / "d"), "--vocab-size", "50257", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "prefix": str(tmp_path / "d"), "dtype": "uint16", "sequences": 3, "documents": 3, "empty_documents": 1,
        "tokens": 6, "sequence_length_min": 1, "sequence_length_mean": 2.0, "sequence_length_max": 3,
        "token_id_min": 1, "token_id_max": 50256,
    }
    assert verify_dataset.main([str(tmp_path / "d"), "--vocab-size", "50000"]) == 1
    err = capsys.readouterr().err
    assert "token id 50256 at sequence 2, position 0 is outside [0, 50000)" in err


def test_verify_reports_corruption(tmp_path, capsys):
    _build(tmp_path / "d", [[[1, 2, 3], [4, 5], [6]]])
    idx = bytearray((tmp_path / "d.idx").read_bytes())
    # Middle pointer 6 -> 4: the sizes still agree, only the full check on the pointers sees it.
    idx[34 + 12 + 8:34 + 12 + 16] = struct.pack("<q", 4)
    (tmp_path / "bad.idx").write_bytes(bytes(idx))
    (tmp_path / "bad.bin").write_bytes((tmp_path / "d.bin").read_bytes())
    (tmp_path / "short.idx").write_bytes((tmp_path / "d.idx").read_bytes())
    (tmp_path / "short.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])
    prefixes = [str(tmp_path / p) for p in ("d", "bad", "short")]
    assert verify_dataset.main(prefixes) == 1
    captured = capsys.readouterr()
    assert f"{prefixes[0]}: OK" in captured.out
    assert "sequence_pointers[1] is 4, expected 6" in captured.err
    assert "truncated data file: expected 12 bytes" in captured.err
