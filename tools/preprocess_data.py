"""Tokenize loose JSON (one document per line) into Megatron indexed datasets (.bin/.idx).

Megatron-LM's flags and output names. Example:

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix my-gpt2 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes ``my-gpt2_text_document.bin/.idx`` (``_sentence`` with --split-sentences; one pair per
--json-keys key); train with ``--data-path my-gpt2_text_document``.

Differences from Megatron-LM, all on the side of safety:
- a bad line (malformed JSON, missing key, non-string text, invalid UTF-8) stops the run with
  ``file:line`` and a snippet; --skip-bad-lines skips such lines and lists them in a rejects
  file (``<output-prefix>_rejects.jsonl`` unless --rejects-file says otherwise);
- outputs appear atomically: never a partial .bin/.idx pair after a crash;
- --split-sentences works offline from NLTK's punkt_tab data and splits in the same pass as
  encoding (no ``_ss`` file, no second run);
- --partitions writes no partition copies of the input; temporary per-partition datasets are
  removed after the merge.
Exit status: 0 on success, 1 on an error (message on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.training.data_preprocessing.bad_lines import BadLinePolicy  # noqa: E402
from megatron.training.data_preprocessing.encoder import EncoderConfig, build_encoder  # noqa: E402
from megatron.training.data_preprocessing.json_lines import resolve_inputs  # noqa: E402
from megatron.training.data_preprocessing.pipeline import (  # noqa: E402
    EncodeStats,
    dataset_prefix,
    encode_to_datasets,
)


def _add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """The training parser's tokenizer group, loaded from its file directly: importing the
    ``arguments_groups`` package would import torch (for help texts), which costs seconds."""
    path = os.path.join(os.path.dirname(__file__), os.path.pardir, "megatron", "training",
                        "arguments_groups", "data.py")
    spec = importlib.util.spec_from_file_location("_preprocess_tokenizer_flags", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.add_tokenizer_args(parser)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True,
                       help="Path to the input jsonl file; with --partitions > 1 (or when no such file exists) "
                            "a glob of files. '.gz' files are read compressed.")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Space-separated keys to extract from each json line; one dataset per key.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Split documents into sentences (NLTK punkt); each sentence is one sequence.")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Keep the whitespace and newlines after each sentence when splitting sentences.")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append an <eod> token to the end of each document.")
    group.add_argument("--lang", type=str, default="english",
                       help="Language of the NLTK punkt model used to split sentences.")
    _add_tokenizer_args(parser)
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Path prefix of the outputs: <prefix>_<key>_<document|sentence>.{bin,idx}.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, required=True,
                       help="Number of worker processes to launch (split evenly over --partitions).")
    group.add_argument("--partitions", type=int, default=1,
                       help="Number of input partitions encoded in parallel and merged at the end.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents.")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="With --partitions > 1, give each partition a contiguous run of lines "
                            "(so the merged order is the input order) instead of every N-th line.")
    group.add_argument("--find-optimal-num-workers", action="store_true",
                       help="Time the first --max-documents documents with each of --workers-to-check "
                            "and encode with the fastest.")
    group.add_argument("--workers-to-check", nargs="+", type=int, default=[16, 32, 64],
                       help="Worker counts tried by --find-optimal-num-workers.")
    group.add_argument("--max-documents", type=int, default=100000,
                       help="Documents timed per worker count by --find-optimal-num-workers.")
    group = parser.add_argument_group(title="bad input")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="Skip input lines that are not valid documents (malformed JSON, missing key, "
                            "non-string text, invalid UTF-8) instead of stopping; they are counted and "
                            "written to the rejects file.")
    group.add_argument("--rejects-file", type=str, default=None,
                       help="Where --skip-bad-lines writes the skipped lines (JSON lines with file, line, "
                            "error and raw text); default <output-prefix>_rejects.jsonl.")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Check flag values; raise ValueError naming the flag. Warnings go to stderr."""
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    if args.partitions < 1:
        raise ValueError(f"--partitions {args.partitions} must be at least 1")
    if args.workers % args.partitions:
        raise ValueError(
            f"--workers {args.workers} must be a multiple of --partitions {args.partitions} (each partition "
            f"gets workers/partitions processes); use e.g. --workers {args.partitions * max(1, args.workers // args.partitions)}"
        )
    if args.log_interval < 1:
        raise ValueError(f"--log-interval {args.log_interval} must be at least 1")
    if args.tokenizer_type is None:
        raise ValueError("--tokenizer-type is required (e.g. GPT2BPETokenizer with --vocab-file and --merge-file)")
    if args.find_optimal_num_workers and args.partitions > 1:
        raise ValueError("--find-optimal-num-workers works with --partitions 1 only")
    if args.rejects_file and not args.skip_bad_lines:
        raise ValueError(f"--rejects-file {args.rejects_file} needs --skip-bad-lines")
    if args.tokenizer_type.lower().startswith("bert") and not args.split_sentences:
        print("warning: a BERT tokenizer without --split-sentences: are you sure you do not want sentences?",
              file=sys.stderr)
    if args.keep_newlines and not args.split_sentences:
        print("warning: --keep-newlines has no effect without --split-sentences", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    args = get_parser().parse_args(argv)
    # Fixed as in Megatron-LM: the tokenizer is built as on one rank, without TP padding or extra ids.
    args.rank = 1
    args.make_vocab_size_divisible_by = 128
    args.tensor_model_parallel_size = 1
    args.vocab_extra_ids = 0
    return args


class _IgnoreBadLines(BadLinePolicy):
    """Timing runs of --find-optimal-num-workers neither stop at nor record bad lines."""

    def handle(self, path, bad_lines) -> None:
        return None


def find_optimal_workers(args, paths, encoder, config) -> int:
    """Time the first --max-documents lines with each --workers-to-check; return the fastest."""
    timings = []
    for workers in args.workers_to_check:
        stats = encode_to_datasets(paths, args.output_prefix, "timing", encoder, workers, _IgnoreBadLines(),
                                   log_interval=10**12, config=config, max_lines=args.max_documents, write=False)
        timings.append((stats.seconds, workers))
        print(f"workers {workers}: {stats.documents} documents in {stats.seconds:.2f}s "
              f"({stats.documents / max(stats.seconds, 1e-9):.1f} docs/s)", file=sys.stderr)
    best = min(timings)[1]
    print(f"using --workers {best}", file=sys.stderr)
    return best


def run(args: argparse.Namespace) -> EncodeStats:
    """Encode ``args.input`` into the output datasets; raise ValueError on bad flags or input."""
    from megatron.training.tokenizer import build_tokenizer

    validate_args(args)
    paths = resolve_inputs(args.input)
    tokenizer = build_tokenizer(args)
    config = EncoderConfig(args, list(args.json_keys), args.split_sentences, args.lang, args.keep_newlines,
                           args.append_eod)
    encoder = build_encoder(config, tokenizer)
    config.dtype = encoder.dtype.name
    level = "sentence" if args.split_sentences else "document"
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist; create it first")
    workers = find_optimal_workers(args, paths, encoder, config) if args.find_optimal_num_workers else args.workers
    rejects = (args.rejects_file or f"{args.output_prefix}_rejects.jsonl") if args.skip_bad_lines else None
    if args.partitions > 1:
        from megatron.training.data_preprocessing.partitions import run_partitions

        return run_partitions(paths, args.output_prefix, level, encoder, config, workers, args.partitions,
                              args.keep_sequential_samples, args.log_interval, rejects)
    policy = BadLinePolicy(rejects)
    try:
        stats = encode_to_datasets(paths, args.output_prefix, level, encoder, workers, policy,
                                   args.log_interval, config=config)
    except BaseException:
        policy.close(publish=False)
        raise
    policy.close()
    return stats


def report(args: argparse.Namespace, stats: EncodeStats, seconds: float) -> None:
    level = "sentence" if args.split_sentences else "document"
    total = sum(stats.tokens.values())
    for key, count in stats.tokens.items():
        print(f"wrote {dataset_prefix(args.output_prefix, key, level)}.{{bin,idx}}: "
              f"{stats.documents} documents, {count} tokens")
    print(f"{stats.documents} documents, {stats.bytes_read / 1e6:.1f} MB, {total} tokens in {seconds:.2f}s "
          f"({total / max(seconds, 1e-9):,.0f} tokens/s)")
    if stats.blank_lines:
        print(f"skipped {stats.blank_lines} blank lines")
    if stats.rejected:
        print(f"skipped {stats.rejected} bad lines, listed in "
              f"{args.rejects_file or args.output_prefix + '_rejects.jsonl'}")


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    try:
        stats = run(args)
    except KeyboardInterrupt:
        print("interrupted; no output was published", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report(args, stats, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
