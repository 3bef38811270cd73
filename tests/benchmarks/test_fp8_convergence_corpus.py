"""benchmarks/fp8_convergence.py --corpus: several JSONL files become one dataset."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fp8_convergence  # noqa: E402

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402


def test_corpus_files_are_preprocessed_together(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"first file line {i}"}) for i in range(3)) + "\n")
    b.write_text("\n".join(json.dumps({"text": f"second file line {i}"}) for i in range(2)))  # no final newline
    work = tmp_path / "work"
    work.mkdir()
    flags = fp8_convergence.preprocess(work, [a, b])
    prefix = flags[flags.index("--data-path") + 1]
    assert len(IndexedDataset(prefix)) == 5  # one document per line of both files


def test_missing_corpus_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--corpus .*nothere.jsonl: no such file"):
        fp8_convergence.main(["--corpus", str(tmp_path / "nothere.jsonl")])
