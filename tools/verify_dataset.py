"""Check indexed datasets (.bin/.idx) and print a summary of each.

    python tools/verify_dataset.py PREFIX [PREFIX ...] [--vocab-size V] [--multimodal] [--json]

Checks: the header (magic, version, dtype code), the file sizes against the counts, the
document index (starts at 0, never decreases, ends at the sequence count), the byte pointers
against the lengths, and with --vocab-size that every token id lies in [0, V). Pass the
tokenizer's vocabulary size (e.g. 50257 for GPT-2), or the padded size to check what the model
can embed. Exit status: 0 if every dataset is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Tuple

import numpy

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.core.datasets.indexed_dataset import DType, IndexedDataset  # noqa: E402

SCAN_ITEMS = 1 << 24  # tokens read per step when scanning the .bin


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="Dataset path prefix (without .bin/.idx).")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="Fail if a token id is negative or not below this size.")
    parser.add_argument("--multimodal", action="store_true", help="The datasets have a modes array.")
    parser.add_argument("--json", action="store_true", help="Print one JSON summary per dataset.")
    return parser


def _scan_tokens(dataset: IndexedDataset, vocab_size: Optional[int]) -> Tuple[Optional[tuple], Optional[int]]:
    """((min, max) token id or None when empty, position of the first id outside [0, vocab_size) or None),
    reading the .bin in chunks."""
    total = int(dataset.sequence_lengths.sum(dtype=numpy.int64))
    low, high, first_bad = None, None, None
    for start in range(0, total, SCAN_ITEMS):
        count = min(SCAN_ITEMS, total - start)
        chunk = dataset.bin_reader.read(dataset.dtype, count, start * DType.size(dataset.dtype))
        low = chunk.min() if low is None else min(low, chunk.min())
        high = chunk.max() if high is None else max(high, chunk.max())
        if vocab_size is not None and first_bad is None:
            bad = numpy.flatnonzero((chunk < 0) | (chunk >= vocab_size))
            first_bad = start + int(bad[0]) if bad.size else None
    return ((int(low), int(high)) if total else None), first_bad


def verify(prefix: str, vocab_size: Optional[int] = None, multimodal: bool = False) -> Dict[str, object]:
    """Summary of a valid dataset; ValueError (naming the file) for the first problem found."""
    dataset = IndexedDataset(prefix, multimodal=multimodal)
    dataset.index.verify_arrays()
    lengths = dataset.sequence_lengths
    doc_sizes = numpy.diff(dataset.document_indices)
    token_range, first_bad = _scan_tokens(dataset, vocab_size)
    summary = {
        "prefix": prefix,
        "dtype": numpy.dtype(dataset.dtype).name,
        "sequences": int(len(dataset)),
        "documents": int(doc_sizes.size),
        "empty_documents": int((doc_sizes == 0).sum()),
        "tokens": int(lengths.sum(dtype=numpy.int64)),
        "sequence_length_min": int(lengths.min()) if lengths.size else 0,
        "sequence_length_mean": float(lengths.mean()) if lengths.size else 0.0,
        "sequence_length_max": int(lengths.max()) if lengths.size else 0,
        "token_id_min": token_range[0] if token_range else None,
        "token_id_max": token_range[1] if token_range else None,
    }
    if first_bad is not None:
        seq = int(numpy.searchsorted(numpy.cumsum(lengths, dtype=numpy.int64), first_bad, side="right"))
        pos = first_bad - int(dataset.sequence_pointers[seq]) // DType.size(dataset.dtype)
        value = int(dataset.get(seq, pos, 1)[0][0] if multimodal else dataset.get(seq, pos, 1)[0])
        raise ValueError(f"{prefix}.bin: token id {value} at sequence {seq}, position {pos} is outside "
                         f"[0, {vocab_size}) (--vocab-size {vocab_size}); ids range over "
                         f"[{token_range[0]}, {token_range[1]}]: was it built with another tokenizer?")
    return summary


def _print_summary(summary: Dict[str, object]) -> None:
    print(f"{summary['prefix']}: OK")
    print(f"  dtype {summary['dtype']}, {summary['sequences']} sequences, {summary['documents']} documents "
          f"({summary['empty_documents']} empty), {summary['tokens']} tokens")
    print(f"  sequence length min/mean/max {summary['sequence_length_min']}/"
          f"{summary['sequence_length_mean']:.1f}/{summary['sequence_length_max']}; "
          f"token ids {summary['token_id_min']}..{summary['token_id_max']}")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    failed = 0
    for prefix in args.prefixes:
        try:
            summary = verify(prefix, args.vocab_size, args.multimodal)
        except (ValueError, OSError) as err:
            failed += 1
            print(f"{prefix}: INVALID: {err}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(summary))
        else:
            _print_summary(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
