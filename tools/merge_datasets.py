"""Merge every indexed dataset (.bin/.idx pair) in a directory into one, in name order.

    python tools/merge_datasets.py --input DIR --output-prefix OUT [--multimodal]

Megatron-LM's tool and flags. Every ``.bin`` needs its ``.idx`` and the other way round; all
datasets must have the same token dtype (the same tokenizer). The output appears atomically.
Exit status: 0 on success, 1 on an error (message on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True,
                       help="Path to the directory holding the .bin/.idx pairs to merge.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Path of the merged dataset, without .bin/.idx.")
    group = parser.add_argument_group(title="miscellaneous")
    group.add_argument("--multimodal", action="store_true", help="The datasets are multimodal.")
    return parser


def dataset_prefixes(directory: str) -> List[str]:
    """Prefixes of the .bin/.idx pairs in ``directory``, sorted; ValueError for an unpaired file."""
    if not os.path.isdir(directory):
        raise ValueError(f"--input {directory} is not a directory")
    names = {}
    for entry in os.listdir(directory):
        prefix, ext = os.path.splitext(entry)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, entry)):
            names.setdefault(prefix, set()).add(ext)
    for prefix, exts in sorted(names.items()):
        if exts != {".bin", ".idx"}:
            (have,), (missing,) = exts, {".bin", ".idx"} - exts
            raise ValueError(f"{os.path.join(directory, prefix + have)} has no {missing} beside it; "
                             f"add it or move the file out of --input {directory}")
    if not names:
        raise ValueError(f"--input {directory} holds no .bin/.idx pairs")
    return [os.path.join(directory, prefix) for prefix in sorted(names)]


def merge(directory: str, output_prefix: str, multimodal: bool = False) -> List[str]:
    """Merge the datasets of ``directory`` into ``output_prefix``; return the merged prefixes."""
    prefixes = dataset_prefixes(directory)
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise ValueError(f"--output-prefix {output_prefix} is one of the inputs in {directory}; "
                         "write the merged dataset elsewhere")
    dtype = IndexedDataset(prefixes[0], multimodal=multimodal).dtype
    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype, multimodal=multimodal)
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(get_idx_path(output_prefix))
    except BaseException:
        builder.abort()
        raise
    return prefixes


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        prefixes = merge(args.input, args.output_prefix, args.multimodal)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    merged = IndexedDataset(args.output_prefix, multimodal=args.multimodal)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: {len(merged)} sequences, "
          f"{len(merged.document_indices) - 1} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
