"""On-disk caches of dataset indices: Megatron's file names, atomic writes, mmap loads.

A cache is a set of files ``<directory>/<base>-<name>`` where ``<base>`` is
``<md5>-<Class>-<split>``: ``description.txt`` plus one ``.npy`` per index. Each file is
written to a temporary sibling and renamed into place; the description goes last, and a
cache counts as present only when every file is, so a build that crashed half way is never
mistaken for a hit (the next run rebuilds it).

Beside them, ``checksums.json`` records each index file's size and CRC-32 when it is written
(before the description); loading checks them, so a rewritten or truncated index file is an
error naming it, not a silently different data order. Caches written by Megatron-LM have no
checksum file and are loaded unchecked.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from typing import Dict, Sequence

import numpy
import torch

from megatron.core.durable_files import atomic_write

logger = logging.getLogger(__name__)

DESCRIPTION = "description.txt"
CHECKSUMS = "checksums.json"


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class IndexCache:
    """The files of one cached index set.

    ``names`` are the index names, e.g. ``["document_index", "sample_index", "shuffle_index"]``.
    """

    def __init__(self, directory: str, base: str, names: Sequence[str]):
        self.directory = directory
        self.base = base
        self.names = list(names)

    def path(self, affix: str) -> str:
        """Path of ``<base>-<affix>`` in the cache directory."""
        return os.path.join(self.directory, f"{self.base}-{affix}")

    def paths(self) -> Dict[str, str]:
        """Index name -> ``.npy`` path."""
        return {name: self.path(f"{name}.npy") for name in self.names}

    def hit(self) -> bool:
        """True when the description and every index file exist."""
        files = [self.path(DESCRIPTION)] + list(self.paths().values())
        return all(os.path.isfile(f) for f in files)

    def load(self) -> Dict[str, numpy.ndarray]:
        """Every index, memory-mapped read-only. Indices are plain integer arrays, so
        pickled content is refused (a crafted file in a shared cache directory must not
        run code), as is a truncated or otherwise unreadable file, naming it."""
        arrays = {name: _load_index(p) for name, p in self.paths().items()}
        expected = self._checksums()
        for name, path in self.paths().items():
            if name in expected:
                _verify(path, expected[name])
        return arrays

    def _checksums(self) -> Dict[str, dict]:
        path = self.path(CHECKSUMS)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"index cache file {path} cannot be read ({error}); delete it and the index files "
                             f"beside it ({self.base}-*; the run builds the indices again)") from None

    def save(self, description: str, arrays: Dict[str, numpy.ndarray]) -> None:
        """Write the indices, then the description, each atomically."""
        os.makedirs(self.directory, exist_ok=True)
        for name, target in self.paths().items():
            atomic_write(target, lambda f, a=arrays[name]: numpy.save(f, a, allow_pickle=False))
        sums = {name: {"bytes": os.path.getsize(p), "crc32": _crc32(p)} for name, p in self.paths().items()}
        atomic_write(self.path(CHECKSUMS), lambda f: f.write(json.dumps(sums, indent=1).encode("utf-8")))
        atomic_write(self.path(DESCRIPTION), lambda f: f.write(description.encode("utf-8")))
        logger.info("saved %s indices to %s", self.base, self.directory)


def _crc32(path: str, chunk: int = 1 << 24) -> int:
    value = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            value = zlib.crc32(block, value)
    return value


def _verify(path: str, expected: dict) -> None:
    """The file has the size and CRC-32 recorded when it was written."""
    size = os.path.getsize(path)
    if size != expected.get("bytes"):
        problem = f"is {size} bytes, {expected.get('bytes')} were written (truncated or replaced)"
    elif _crc32(path) != expected.get("crc32"):
        problem = "does not have the content that was written (its CRC-32 differs: rewritten or corrupted)"
    else:
        return
    raise ValueError(f"index cache file {path} {problem}; delete it (the run builds the indices again)")


def _load_index(path: str) -> numpy.ndarray:
    try:
        array = numpy.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"index cache file {path} cannot be read as a plain array ({error}); delete it "
                         "(the run builds the indices again)") from None
    if array.dtype.kind not in "iu":
        raise ValueError(f"index cache file {path} holds {array.dtype} values, not integer indices; delete it "
                         "(the run builds the indices again)")
    return array
