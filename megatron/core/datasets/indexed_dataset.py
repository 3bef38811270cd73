"""Megatron's indexed dataset: token ids in ``<prefix>.bin``, their index in ``<prefix>.idx``.

The byte layout is Megatron-LM's (megatron-facts section 2), so datasets written by either
project are read by the other:

- ``.bin``: the tokens of every sequence back to back, little-endian, no header.
- ``.idx``: magic ``b"MMIDIDX\\x00\\x00"``, u64 version 1, u8 dtype code, u64 sequence count N,
  u64 document count D (documents + 1), then int32[N] lengths, int64[N] byte pointers, int64[D]
  document boundaries starting with 0, and int8[N] modes in multimodal datasets only.

The reader memory-maps the ``.idx`` and returns zero-copy array views; it checks the header and
the file sizes when a dataset is opened, so a truncated or mismatched pair fails at once with
the file and the expected and actual sizes. The writer produces its two files under temporary
names and publishes them only in ``finalize``, the ``.idx`` last, so a crash never leaves a
valid-looking partial pair.

This module does not import torch: the preprocessing tools use it and start faster without.
``IndexedDataset`` is a map-style dataset (``__len__``/``__getitem__``) that torch's DataLoader
accepts as is.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import struct
import time
import uuid
from array import array
from enum import Enum
from typing import Iterable, List, Optional, Tuple, Type, Union

import numpy

from megatron.core.durable_files import fsync_directory

logger = logging.getLogger(__name__)

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_LEGACY_INDEX_HEADER = b"TNTIDX\x00\x00"
_INDEX_VERSION = 1
# magic (9) + version (u64) + dtype code (u8) + sequence count (u64) + document count (u64)
_HEADER_FORMAT = "<9sQBQQ"
_HEADER_SIZE = struct.calcsize(_HEADER_FORMAT)
_MAX_SEQUENCE_LENGTH = 2**31 - 1  # lengths are stored as int32
_COPY_BUFFER_BYTES = 16 * 1024 * 1024
_BIN_READ_RETRIES = 3


class DType(Enum):
    """Dtype codes of the ``.idx`` header (the enum value is the code)."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_from_dtype(cls, value) -> int:
        """The code of a numpy dtype (``numpy.uint16`` -> 8); ValueError if it has none."""
        name = numpy.dtype(value).name
        if name not in cls.__members__:
            raise ValueError(
                f"dtype {name} cannot be stored in an indexed dataset; use one of {', '.join(cls.__members__)}"
            )
        return cls[name].value

    @classmethod
    def dtype_from_code(cls, value: int) -> Type[numpy.number]:
        """The numpy scalar type of a code (8 -> ``numpy.uint16``)."""
        return getattr(numpy, cls(value).name)

    @staticmethod
    def size(key) -> int:
        """Bytes per item of a code (int) or a numpy dtype."""
        if isinstance(key, int) and not isinstance(key, bool):
            return numpy.dtype(DType.dtype_from_code(key)).itemsize
        return numpy.dtype(key).itemsize

    @staticmethod
    def optimal_dtype(cardinality: Optional[int]) -> Type[numpy.number]:
        """Megatron's token dtype for a vocabulary: uint16 below 65500 ids, else int32.

        The threshold is 65500, not 65536, exactly as in Megatron-LM, so both pick the
        same dtype (and write the same bytes) for every vocabulary size.
        """
        if cardinality is not None and cardinality < 65500:
            return numpy.uint16
        return numpy.int32


def get_idx_path(path_prefix: str) -> str:
    """``<prefix>.idx``."""
    return path_prefix + ".idx"


def get_bin_path(path_prefix: str) -> str:
    """``<prefix>.bin``."""
    return path_prefix + ".bin"


def _index_size(sequence_count: int, document_count: int, multimodal: bool) -> int:
    """Bytes of a well-formed ``.idx`` with these counts."""
    return _HEADER_SIZE + 12 * sequence_count + 8 * document_count + (sequence_count if multimodal else 0)


def _file_size(path: str, what: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None


def _check_index_header(idx_path: str, header: bytes, actual_size: int, multimodal: bool) -> Tuple[int, int, int]:
    """Parse the 34-byte header; return (dtype code, N, D) or raise ValueError naming the file."""
    magic = header[: len(_INDEX_HEADER)]
    if magic != _INDEX_HEADER:
        if header.startswith(_LEGACY_INDEX_HEADER):
            raise ValueError(
                f"{idx_path}: magic {header[:8]!r} is the pre-2023 'lazy/cached' index format, which "
                "Megatron-LM no longer reads either; re-run tools/preprocess_data.py on the source text"
            )
        if not _INDEX_HEADER.startswith(magic):
            raise ValueError(
                f"{idx_path}: bad magic {magic!r}, expected {_INDEX_HEADER!r}; "
                "this is not the .idx of a Megatron indexed dataset"
            )
    if len(header) < _HEADER_SIZE:
        raise ValueError(
            f"{idx_path}: truncated index: the header needs {_HEADER_SIZE} bytes, the file has {actual_size}"
        )
    _, version, code, sequence_count, document_count = struct.unpack(_HEADER_FORMAT, header)
    if version != _INDEX_VERSION:
        raise ValueError(f"{idx_path}: index version {version} is not supported, expected {_INDEX_VERSION}")
    if code not in DType._value2member_map_:
        raise ValueError(
            f"{idx_path}: dtype code {code} is unknown, expected one of 1-8 "
            f"({', '.join(f'{d.value}={d.name}' for d in DType)})"
        )
    if document_count < 1:
        raise ValueError(
            f"{idx_path}: document count is 0, expected at least 1 (the document index starts with 0)"
        )
    expected = _index_size(sequence_count, document_count, multimodal)
    if actual_size != expected:
        raise ValueError(_index_size_message(idx_path, expected, actual_size, sequence_count, document_count, multimodal))
    return code, sequence_count, document_count


def _index_size_message(idx_path: str, expected: int, actual: int, n: int, d: int, multimodal: bool) -> str:
    kind = "truncated index" if actual < expected else "over-long index"
    message = (
        f"{idx_path}: {kind}: expected {expected} bytes for {n} sequences and {d - 1} documents"
        f"{' with modes' if multimodal else ''}, the file has {actual}"
    )
    if n and not multimodal and actual == expected + n:
        message += "; the extra bytes match a modes array: open it with multimodal=True (--multimodal)"
    elif n and multimodal and actual == expected - n:
        message += "; it has no modes array: it is not multimodal, open it with multimodal=False"
    return message


class _IndexReader:
    """The ``.idx`` of a dataset, memory-mapped; the arrays are zero-copy views of the map.

    Attributes: ``dtype`` (numpy scalar type of the tokens), ``dtype_size``, ``sequence_count``,
    ``document_count``, ``sequence_lengths`` int32[N], ``sequence_pointers`` int64[N] (bytes),
    ``document_indices`` int64[D], ``sequence_modes`` int8[N] or None.
    """

    def __init__(self, idx_path: str, multimodal: bool, full_check: bool = True):
        self.idx_path = idx_path
        self.multimodal = multimodal
        start = time.perf_counter()
        actual_size = _file_size(idx_path, "index file")
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        code, n, d = _check_index_header(idx_path, header, actual_size, multimodal)
        self.dtype = DType.dtype_from_code(code)
        self.dtype_size = DType.size(code)
        self.sequence_count = n
        self.document_count = d

        self._mmap = numpy.memmap(idx_path, mode="r", order="C")
        buffer = memoryview(self._mmap)
        offset = _HEADER_SIZE
        self.sequence_lengths = numpy.frombuffer(buffer, dtype=numpy.int32, count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = numpy.frombuffer(buffer, dtype=numpy.int64, count=n, offset=offset)
        offset += 8 * n
        self.document_indices = numpy.frombuffer(buffer, dtype=numpy.int64, count=d, offset=offset)
        offset += 8 * d
        self.sequence_modes = (
            numpy.frombuffer(buffer, dtype=numpy.int8, count=n, offset=offset) if multimodal else None
        )
        self._check_arrays()
        if full_check:
            # Vectorized over the index (not the .bin): a bad pointer or a decreasing
            # document boundary fails here, naming the file, instead of as an IndexError
            # in a DataLoader worker much later.
            self.verify_arrays()
        logger.debug("opened %s: %d sequences, %d documents in %.3fs", idx_path, n, d - 1,
                     time.perf_counter() - start)

    def _check_arrays(self) -> None:
        """O(1) consistency checks; ``verify_arrays`` does the full O(N) ones."""
        first, last = int(self.document_indices[0]), int(self.document_indices[-1])
        if first != 0:
            raise ValueError(f"{self.idx_path}: document_indices[0] is {first}, expected 0")
        if last != self.sequence_count:
            raise ValueError(
                f"{self.idx_path}: inconsistent counts: document_indices[-1] is {last}, expected the "
                f"sequence count {self.sequence_count} (len(sequence_lengths))"
            )
        if self.sequence_count and int(self.sequence_pointers[0]) != 0:
            raise ValueError(f"{self.idx_path}: sequence_pointers[0] is {int(self.sequence_pointers[0])}, expected 0")

    def bin_size(self) -> int:
        """Bytes the ``.bin`` must have: the end of the last sequence (pointers are cumulative)."""
        if self.sequence_count == 0:
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype_size

    def verify_arrays(self) -> None:
        """Full checks (O(N)): lengths >= 0, pointers equal the byte offsets implied by the
        lengths, document boundaries non-decreasing. Raises ValueError naming the first bad entry."""
        lengths = self.sequence_lengths
        negative = numpy.flatnonzero(lengths < 0)
        if negative.size:
            i = int(negative[0])
            raise ValueError(f"{self.idx_path}: sequence_lengths[{i}] is {int(lengths[i])}, expected >= 0")
        expected = numpy.zeros(self.sequence_count, dtype=numpy.int64)
        if self.sequence_count > 1:
            numpy.cumsum(lengths[:-1], dtype=numpy.int64, out=expected[1:])
            expected *= self.dtype_size
        bad = numpy.flatnonzero(expected != self.sequence_pointers)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{self.idx_path}: sequence_pointers[{i}] is {int(self.sequence_pointers[i])}, expected "
                f"{int(expected[i])} (the byte offset after the preceding sequences)"
            )
        steps = numpy.flatnonzero(numpy.diff(self.document_indices) < 0)
        if steps.size:
            i = int(steps[0]) + 1
            raise ValueError(
                f"{self.idx_path}: document_indices[{i}] = {int(self.document_indices[i])} is smaller than "
                f"document_indices[{i - 1}] = {int(self.document_indices[i - 1])}; boundaries must not decrease"
            )

    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, idx: int) -> Tuple[int, int, Optional[int]]:
        """(byte pointer, length, mode or None) of sequence ``idx``."""
        mode = int(self.sequence_modes[idx]) if self.multimodal else None
        return int(self.sequence_pointers[idx]), int(self.sequence_lengths[idx]), mode


class _MMapBinReader:
    """Reads the ``.bin`` through a read-only memory map (zero-copy views)."""

    def __init__(self, bin_path: str):
        self.bin_path = bin_path
        # numpy cannot map an empty file; an empty dataset reads from an empty buffer instead.
        if os.path.getsize(bin_path) == 0:
            self._buffer = memoryview(b"")
        else:
            self._mmap = numpy.memmap(bin_path, mode="r", order="C")
            self._buffer = memoryview(self._mmap)

    def read(self, dtype: Type[numpy.number], count: int, offset: int) -> numpy.ndarray:
        """``count`` items of ``dtype`` from byte ``offset``."""
        return numpy.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset)


class _FileBinReader:
    """Reads the ``.bin`` with positioned file reads (``--no-mmap-bin-files``).

    Each read opens the file, so the reader survives fork and pickling; a failed read is
    retried with exponential backoff, as Megatron does for network file systems.
    """

    def __init__(self, bin_path: str):
        self.bin_path = bin_path

    def read(self, dtype: Type[numpy.number], count: int, offset: int) -> numpy.ndarray:
        out = numpy.empty(count, dtype=dtype)
        want = out.nbytes
        for attempt in range(_BIN_READ_RETRIES):
            try:
                with open(self.bin_path, "rb", buffering=0) as f:
                    f.seek(offset)
                    got = f.readinto(memoryview(out).cast("B"))
                if got != want:
                    raise ValueError(
                        f"{self.bin_path}: short read: wanted {want} bytes at offset {offset}, got {got}"
                    )
                return out
            except OSError:
                if attempt == _BIN_READ_RETRIES - 1:
                    raise
                time.sleep(0.1 * 2**attempt)
        return out


class IndexedDataset:
    """Read-only view of the dataset at ``path_prefix`` (``.bin`` + ``.idx``).

    Args:
        path_prefix: the path without ``.bin``/``.idx``.
        multimodal: the ``.idx`` has a modes array (nothing in the file says so).
        mmap: memory-map the ``.bin`` (default); False reads it with file reads
            (``--no-mmap-bin-files``). The ``.idx`` is always memory-mapped.
        object_storage_config, s3_config: accepted for Megatron-Core compatibility; object
            storage is not supported, so they must be None.

    ``dataset[i]`` is sequence ``i`` as a 1-D numpy array of the index dtype (a tuple
    ``(array, mode)`` when multimodal); ``dataset[a:b]`` a list of them (and the modes).
    Raises ValueError on open if the files are inconsistent, naming the file and the sizes.
    """

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True,
                 object_storage_config=None, s3_config=None):
        if object_storage_config is not None or s3_config is not None:
            raise ValueError(
                f"IndexedDataset {path_prefix}: object storage (s3://, msc://) is not supported; "
                "copy the .bin/.idx to a local or network file system and pass that prefix"
            )
        self.initialize(path_prefix, multimodal, mmap)

    def initialize(self, path_prefix: str, multimodal: bool, mmap: bool, full_check: bool = True) -> None:
        """Open and check the files (also used when unpickling, where the O(N) index
        checks, done when the dataset was first opened, are skipped)."""
        self.path_prefix = path_prefix
        self.multimodal = multimodal
        self.mmap = mmap
        self.index = _IndexReader(get_idx_path(path_prefix), multimodal, full_check)
        bin_path = get_bin_path(path_prefix)
        expected = self.index.bin_size()
        actual = _file_size(bin_path, "data file")
        if actual != expected:
            kind = "truncated data file" if actual < expected else "over-long data file"
            raise ValueError(
                f"{bin_path}: {kind}: expected {expected} bytes ({expected // self.index.dtype_size} tokens of "
                f"{numpy.dtype(self.index.dtype).name}, as {get_idx_path(path_prefix)} says), the file has {actual}"
            )
        self.bin_reader = _MMapBinReader(bin_path) if mmap else _FileBinReader(bin_path)

    def __getstate__(self) -> Tuple[str, bool, bool]:
        return self.path_prefix, self.multimodal, self.mmap

    def __setstate__(self, state: Tuple[str, bool, bool]) -> None:
        self.initialize(*state, full_check=False)

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.index)

    def __getitem__(self, idx: Union[int, numpy.integer, slice]):
        if isinstance(idx, (int, numpy.integer)) and not isinstance(idx, bool):
            pointer, length, mode = self.index[self._position(idx)]
            sequence = self.bin_reader.read(self.index.dtype, length, pointer)
            return (sequence, mode) if self.multimodal else sequence
        if isinstance(idx, slice):
            return self._read_slice(idx)
        raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(idx).__name__}")

    def _position(self, idx: int) -> int:
        n = len(self)
        position = int(idx) + n if idx < 0 else int(idx)
        if not 0 <= position < n:
            raise IndexError(f"sequence {int(idx)} is out of range for {self.path_prefix} ({n} sequences)")
        return position

    def _read_slice(self, idx: slice):
        start, stop, step = idx.indices(len(self))
        if step != 1:
            raise ValueError(f"slices of an IndexedDataset must be contiguous (step 1), got step {step}")
        stop = max(start, stop)
        lengths = self.index.sequence_lengths[start:stop]
        if stop > start:
            total = int(lengths.sum(dtype=numpy.int64))
            flat = self.bin_reader.read(self.index.dtype, total, int(self.index.sequence_pointers[start]))
            sequences = numpy.split(flat, numpy.cumsum(lengths[:-1], dtype=numpy.int64))
        else:
            sequences = []
        if self.multimodal:
            return sequences, self.index.sequence_modes[start:stop]
        return sequences

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None):
        """Items ``offset`` to ``offset + length`` of sequence ``idx`` (to its end if ``length`` is None).

        Reads from byte ``pointer[idx] + offset * itemsize``; a range outside the sequence
        raises IndexError instead of reading a neighbour's tokens.
        """
        pointer, sequence_length, mode = self.index[self._position(idx)]
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(
                f"get({int(idx)}, offset={offset}, length={length}) is outside sequence {int(idx)} of "
                f"{self.path_prefix}, which has {sequence_length} tokens"
            )
        sequence = self.bin_reader.read(self.index.dtype, length, pointer + offset * self.index.dtype_size)
        return (sequence, mode) if self.multimodal else sequence

    @property
    def dtype(self) -> Type[numpy.number]:
        """Numpy scalar type of the token ids."""
        return self.index.dtype

    @property
    def sequence_lengths(self) -> numpy.ndarray:
        """int32[N]: tokens per sequence."""
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> numpy.ndarray:
        """int64[N]: byte offset of each sequence in the ``.bin``."""
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> numpy.ndarray:
        """int64[D]: sequence boundaries of the documents, starting with 0 and ending with N."""
        return self.index.document_indices

    def get_document_indices(self) -> numpy.ndarray:
        """The document boundaries (Megatron-Core accessor)."""
        return self.index.document_indices

    def set_document_indices(self, document_indices: numpy.ndarray) -> None:
        """Replace the document boundaries in memory (Megatron-Core uses it to regroup sequences)."""
        self.index.document_indices = document_indices

    @property
    def sequence_modes(self) -> Optional[numpy.ndarray]:
        """int8[N] modes of a multimodal dataset, else None."""
        return self.index.sequence_modes

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """True if both ``<prefix>.idx`` and ``<prefix>.bin`` exist (their contents are not checked)."""
        return os.path.exists(get_idx_path(path_prefix)) and os.path.exists(get_bin_path(path_prefix))


def _temporary_path(path: str) -> str:
    """A unique sibling of ``path`` that is never mistaken for a dataset file. The host
    and pid in the name tell ``remove_stale_temporaries`` whether its writer still runs."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


_TEMPORARY_SUFFIX = re.compile(r"^\.tmp\.(?P<host>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete temporaries of ``path`` whose writer, on this host, no longer runs (a killed
    preprocessing run leaves its ``.bin.tmp.*`` behind). Another host's are kept: their
    pid means nothing here. Returns the paths removed."""
    host = socket.gethostname()
    removed = []
    for candidate in glob.glob(glob.escape(path) + ".tmp.*"):
        match = _TEMPORARY_SUFFIX.match(candidate[len(path):])
        if not match or match["host"] != host or _running(int(match["pid"])):
            continue
        try:
            os.remove(candidate)
        except FileNotFoundError:
            continue
        removed.append(candidate)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted writer: %s", len(removed), removed)
    return removed


def write_index(idx_file, dtype, sequence_lengths: numpy.ndarray, document_indices: numpy.ndarray,
                sequence_modes: Optional[numpy.ndarray] = None) -> None:
    """Write a ``.idx`` to the binary file object ``idx_file``; pointers are derived from the lengths.

    ``sequence_lengths`` int-like[N] (each < 2**31), ``document_indices`` int-like[D] starting
    with 0 and ending with N, ``sequence_modes`` int8-like[N] for multimodal datasets.
    """
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > _MAX_SEQUENCE_LENGTH):
        raise ValueError(f"sequence lengths must lie in [0, {_MAX_SEQUENCE_LENGTH}] to fit the int32 index")
    documents = numpy.asarray(document_indices, dtype=numpy.int64)
    if documents.size == 0 or documents[0] != 0 or documents[-1] != lengths.size:
        raise ValueError(
            f"document indices must start with 0 and end with the sequence count {lengths.size}; "
            f"got {documents[:1].tolist()} ... {documents[-1:].tolist()} (call end_document after add_item)"
        )
    pointers = numpy.zeros(lengths.size, dtype=numpy.int64)
    if lengths.size > 1:
        numpy.cumsum(lengths[:-1], out=pointers[1:])
    pointers *= DType.size(dtype)
    idx_file.write(struct.pack(_HEADER_FORMAT, _INDEX_HEADER, _INDEX_VERSION, DType.code_from_dtype(dtype),
                               lengths.size, documents.size))
    idx_file.write(lengths.astype("<i4").tobytes())
    idx_file.write(pointers.astype("<i8").tobytes())
    idx_file.write(documents.astype("<i8").tobytes())
    if sequence_modes is not None:
        idx_file.write(numpy.asarray(sequence_modes, dtype=numpy.int8).tobytes())


def _as_tokens(tokens, dtype: numpy.dtype) -> numpy.ndarray:
    """``tokens`` (array, list, CPU tensor) as a flat array of ``dtype``; ids that do not fit raise."""
    arr = numpy.asarray(tokens)
    if arr.dtype != dtype:
        if arr.size and arr.dtype.kind in "iu" and dtype.kind in "iu":
            info = numpy.iinfo(dtype)
            low, high = int(arr.min()), int(arr.max())
            if low < info.min or high > info.max:
                raise ValueError(
                    f"token ids in [{low}, {high}] do not fit the dataset dtype {dtype.name} "
                    f"([{info.min}, {info.max}]); build the dataset with a wider dtype"
                )
        arr = arr.astype(dtype)
    return arr.reshape(-1)


def _extend(target: array, values) -> None:
    """Append ``values`` (array-like) to a typed ``array`` without a per-item Python loop."""
    target.frombytes(numpy.ascontiguousarray(values, dtype=numpy.dtype(target.typecode)).tobytes())


class IndexedDatasetBuilder:
    """Writes a dataset: tokens stream to a temporary ``.bin``; ``finalize`` writes the ``.idx``
    and publishes both (``.bin`` then ``.idx``) by rename.

    Args:
        bin_path: final path of the ``.bin``.
        dtype: numpy type of the token ids (``DType.optimal_dtype(vocab_size)`` for text).
        multimodal: also record a mode per sequence.

    Until ``finalize`` the data lives in ``<bin_path>.tmp.<host>.<pid>.<random>``; ``abort``
    deletes it, and a later builder of the same path deletes one whose writer was killed.
    """

    def __init__(self, bin_path: str, dtype: Type[numpy.number] = numpy.int32, multimodal: bool = False):
        self.bin_path = bin_path
        self.dtype = numpy.dtype(dtype).type
        DType.code_from_dtype(self.dtype)
        self._np_dtype = numpy.dtype(self.dtype)
        self.multimodal = multimodal
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self.sequence_modes = array("b") if multimodal else None
        directory = os.path.dirname(os.path.abspath(bin_path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot write {bin_path}: directory {directory} does not exist")
        for final in (bin_path, os.path.splitext(bin_path)[0] + ".idx"):
            remove_stale_temporaries(final)
        self._tmp_bin_path = _temporary_path(bin_path)
        self.data_file = open(self._tmp_bin_path, "xb")

    def add_item(self, tensor, mode: int = 0) -> None:
        """Append one sequence (any array-like of ids); end the document with ``end_document``."""
        arr = _as_tokens(tensor, self._np_dtype)
        self.data_file.write(memoryview(numpy.ascontiguousarray(arr)).cast("B"))
        self.sequence_lengths.append(arr.size)
        if self.multimodal:
            self.sequence_modes.append(mode)

    def add_document(self, tensor, lengths: Iterable[int], modes: Optional[Iterable[int]] = None) -> None:
        """Append one document: ``tensor`` holds the tokens of all its sequences, ``lengths`` their sizes.

        An empty ``lengths`` records an empty document (a repeated boundary).
        """
        arr = _as_tokens(tensor, self._np_dtype)
        lengths = list(lengths)
        if sum(lengths) != arr.size:
            raise ValueError(f"add_document: the lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
        self.data_file.write(memoryview(numpy.ascontiguousarray(arr)).cast("B"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.multimodal:
            self.sequence_modes.extend(list(modes) if modes is not None else [0] * len(lengths))

    def add_encoded_documents(self, token_bytes, sequence_lengths: array, document_ends: array) -> None:
        """Append many documents at once, already encoded (the preprocessing tool's fast path).

        ``token_bytes``: the raw ``.bin`` bytes of the documents, in this builder's dtype;
        ``sequence_lengths``: their sequence lengths; ``document_ends``: for each document, the
        number of sequences before its end, counted from the first of these documents.
        """
        offset = len(self.sequence_lengths)
        self.data_file.write(token_bytes)
        _extend(self.sequence_lengths, sequence_lengths)
        _extend(self.document_indices, numpy.asarray(document_ends, dtype=numpy.int64) + offset)
        if self.multimodal:
            _extend(self.sequence_modes, numpy.zeros(len(sequence_lengths), dtype=numpy.int8))

    def end_document(self) -> None:
        """Close the current document (after one or more ``add_item``)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append the whole dataset at ``path_prefix`` (same dtype; checked like ``IndexedDataset``)."""
        other = IndexedDataset(path_prefix, multimodal=self.multimodal, mmap=False)
        index = other.index
        if index.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {path_prefix}: its dtype is {numpy.dtype(index.dtype).name}, this dataset's is "
                f"{self._np_dtype.name}; datasets built with different tokenizers cannot be merged"
            )
        offset = len(self.sequence_lengths)
        _extend(self.sequence_lengths, index.sequence_lengths)
        _extend(self.document_indices, index.document_indices[1:] + offset)
        if self.multimodal:
            _extend(self.sequence_modes, index.sequence_modes)
        with open(get_bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self.data_file, _COPY_BUFFER_BYTES)

    def finalize(self, idx_path: str) -> None:
        """Write the ``.idx`` and publish both files.

        Order: the ``.bin`` and ``.idx`` are written and synced under temporary names, an old
        ``.idx`` at ``idx_path`` is removed, the ``.bin`` is renamed into place, then the
        ``.idx``. At every instant the prefix is either absent, the old pair, a ``.bin`` without
        ``.idx``, or the complete new pair.
        """
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        self.data_file.close()
        tmp_idx_path = _temporary_path(idx_path)
        try:
            with open(tmp_idx_path, "xb") as f:
                write_index(
                    f, self.dtype,
                    numpy.frombuffer(self.sequence_lengths, dtype=numpy.int32),
                    numpy.frombuffer(self.document_indices, dtype=numpy.int64),
                    numpy.frombuffer(self.sequence_modes, dtype=numpy.int8) if self.multimodal else None,
                )
                f.flush()
                os.fsync(f.fileno())
            if os.path.lexists(idx_path):
                os.remove(idx_path)
            os.replace(self._tmp_bin_path, self.bin_path)
            os.replace(tmp_idx_path, idx_path)
        except BaseException:
            for path in (tmp_idx_path, self._tmp_bin_path):
                if os.path.exists(path):
                    os.remove(path)
            raise
        fsync_directory(os.path.dirname(os.path.abspath(idx_path)))

    def abort(self) -> None:
        """Discard what was written: close and delete the temporary ``.bin``."""
        if not self.data_file.closed:
            self.data_file.close()
        if os.path.exists(self._tmp_bin_path):
            os.remove(self._tmp_bin_path)
