"""Token ids outside the vocabulary are refused when a dataset is built, not at a later lookup.

A ``.bin`` tokenized with another tokenizer holds ids the model cannot embed (an IndexError
deep in a forward, or in a DataLoader worker, without the file's name) or, below the padded
size, ids that silently train unused rows. Building a GPT dataset therefore reads the
smallest and largest id of its ``.bin`` (chunked, vectorized: about a second per GB) and
compares them with the tokenizer's vocabulary. The pair is kept in memory for the other
splits and, when the dataset has an index cache directory, in a small file there
(``<name>-<bytes>-<mtime>-token_range.json``) so that later runs read it instead of the
``.bin``; a rewritten ``.bin`` has another size or modification time, hence another key.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Tuple

import numpy

from megatron.core.durable_files import atomic_write

logger = logging.getLogger(__name__)

SCAN_ITEMS = 1 << 24  # tokens read per step
_KNOWN: Dict[Tuple[str, int, int], Tuple[int, int]] = {}


def token_range(bin_path: str, dtype) -> Tuple[int, int]:
    """(smallest, largest) id in the ``.bin`` (``(0, -1)`` for an empty file)."""
    tokens = os.path.getsize(bin_path) // numpy.dtype(dtype).itemsize
    if tokens == 0:
        return 0, -1
    data = numpy.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,))
    low, high = None, None
    for start in range(0, tokens, SCAN_ITEMS):
        chunk = data[start:start + SCAN_ITEMS]
        chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
    del data
    return low, high


def _cached_token_range(bin_path: str, dtype, cache_dir: Optional[str]) -> Tuple[int, int]:
    stat = os.stat(bin_path)
    key = (os.path.abspath(bin_path), stat.st_size, stat.st_mtime_ns)
    if key in _KNOWN:
        return _KNOWN[key]
    record = None
    if cache_dir:
        name = f"{os.path.basename(bin_path)}-{stat.st_size}-{stat.st_mtime_ns}-token_range.json"
        record = os.path.join(cache_dir, name)
        try:
            with open(record, encoding="utf-8") as handle:
                saved = json.load(handle)
            _KNOWN[key] = (int(saved["min"]), int(saved["max"]))
            return _KNOWN[key]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: scan the .bin again and rewrite it
    _KNOWN[key] = token_range(bin_path, dtype)
    if record is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            text = json.dumps({"min": _KNOWN[key][0], "max": _KNOWN[key][1]})
            atomic_write(record, lambda f: f.write(text.encode("utf-8")))
        except OSError as error:  # a read-only cache directory only costs the scan next time
            logger.warning("could not record the token range of %s in %s (%s)", bin_path, cache_dir, error)
    return _KNOWN[key]


def check_token_ids(dataset, vocab_size: Optional[int], cache_dir: Optional[str] = None) -> None:
    """Raise ValueError when ``dataset`` (an ``IndexedDataset``) holds an id outside
    ``[0, vocab_size)``, naming the file, the id, the vocabulary size and the fixes."""
    prefix = getattr(dataset, "path_prefix", None)
    if prefix is None or not vocab_size:
        return
    bin_path = prefix + ".bin"
    low, high = _cached_token_range(bin_path, dataset.index.dtype, cache_dir)
    if high < 0 and low == 0:
        return
    bad = high if high >= vocab_size else (low if low < 0 else None)
    if bad is None:
        return
    raise ValueError(
        f"{bin_path} holds token id {bad}, outside the tokenizer's vocabulary of {vocab_size} ids (ids "
        f"{low}..{high} in the file): the data was tokenized with another tokenizer. Give the tokenizer it "
        f"was made with (--tokenizer-type, --tokenizer-model, --vocab-file, or --vocab-size for the null "
        f"tokenizer), or tokenize it again; python tools/verify_dataset.py {prefix} --vocab-size {vocab_size} "
        f"names the first sequence that holds one.")
