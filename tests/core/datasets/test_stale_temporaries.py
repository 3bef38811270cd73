"""A killed writer's ``.bin.tmp.*`` is removed by the next builder of the same dataset;
temporaries of a running writer or of another host are kept."""

import os
import socket
import subprocess
import sys

import numpy

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporaries_are_removed(tmp_path):
    bin_path = str(tmp_path / "corpus_text_document.bin")
    host = socket.gethostname()
    stale = [f"{bin_path}.tmp.{host}.{_dead_pid()}.0123abcd",
             str(tmp_path / f"corpus_text_document.idx.tmp.{host}.{_dead_pid()}.89abcdef")]
    kept = [f"{bin_path}.tmp.{host}.{os.getpid()}.fedcba98",  # this process: still running
            f"{bin_path}.tmp.other-host.{_dead_pid()}.00000000"]
    for path in stale + kept:
        open(path, "wb").close()
    builder = IndexedDatasetBuilder(bin_path, dtype=numpy.uint16)
    builder.add_item(numpy.array([1, 2, 3]))
    builder.end_document()
    builder.finalize(str(tmp_path / "corpus_text_document.idx"))
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in kept)
