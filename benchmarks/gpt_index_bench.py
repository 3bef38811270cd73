"""Time and peak memory of building GPT dataset indices for a synthetic 10-billion-token corpus.

Usage: python benchmarks/gpt_index_bench.py [--tokens 1e10] [--mean-doc 1000] [--seq-length 2048]
                                            [--epochs 1] [--cache-dir DIR]

Document lengths are lognormal (sigma 1.0, mean ``--mean-doc`` tokens; ~10M documents for
10B tokens), as web text roughly is. The indices are built exactly as GPTDataset builds
them: document index (shuffle), sample index, shuffle index, one RandomState. With
``--cache-dir`` they are also saved as GPTDataset writes its cache. Goal: under 30 s and
bounded memory (the indices themselves are ~12 bytes per document per epoch + 12 bytes
per sample).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron.core.datasets.gpt_indices import (
    build_document_index,
    build_sample_index,
    build_shuffle_index,
    num_epochs_needed,
    num_samples_in,
    separate_final_epoch_needed,
)
from megatron.core.datasets.index_cache import IndexCache


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_lengths(tokens: int, mean_doc: float, seed: int = 0) -> numpy.ndarray:
    """int32 lognormal document lengths (>= 1) summing to about ``tokens``."""
    sigma = 1.0
    mu = numpy.log(mean_doc) - sigma * sigma / 2
    count = int(tokens / mean_doc)
    rng = numpy.random.default_rng(seed)
    lengths = numpy.maximum(rng.lognormal(mu, sigma, size=count), 1).astype(numpy.int32)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e10)
    parser.add_argument("--mean-doc", type=float, default=1000.0)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=1.0, help="samples requested, in epochs (1.5: two epochs, the last separate)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cache-dir", type=str, default=None)
    args = parser.parse_args()

    t0 = time.perf_counter()
    lengths = synthetic_lengths(int(args.tokens), args.mean_doc)
    documents = numpy.arange(len(lengths), dtype=numpy.int32)
    t_data = time.perf_counter() - t0
    rss_data = _peak_rss_mib()
    tokens_per_epoch = int(lengths.sum(dtype=numpy.int64))
    S = args.seq_length
    num_samples = int(args.epochs * (tokens_per_epoch - 1) // S)

    times = {}
    t = time.perf_counter()
    epochs = num_epochs_needed(tokens_per_epoch, num_samples, S)
    separate = separate_final_epoch_needed(tokens_per_epoch, epochs, num_samples, S)
    rng = numpy.random.RandomState(args.seed)
    document_index = build_document_index(documents, epochs, rng, separate)
    times["document index"] = time.perf_counter() - t
    t = time.perf_counter()
    total = num_samples_in(epochs, tokens_per_epoch, S)
    sample_index = build_sample_index(lengths, document_index, S, total)
    times["sample index"] = time.perf_counter() - t
    t = time.perf_counter()
    if separate:
        before = ((epochs - 1) * tokens_per_epoch - 1) // S
        shuffle_index = build_shuffle_index(before, total, rng)
    else:
        shuffle_index = build_shuffle_index(total, total, rng)
    times["shuffle index"] = time.perf_counter() - t
    if args.cache_dir:
        t = time.perf_counter()
        IndexCache(args.cache_dir, "bench-GPTDataset-train", ["document_index", "sample_index", "shuffle_index"]).save(
            "{}", {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index})
        times["save cache"] = time.perf_counter() - t
    build = sum(times.values())

    index_mib = (document_index.nbytes + sample_index.nbytes + shuffle_index.nbytes) / 2**20
    print(f"python {platform.python_version()}, numpy {numpy.__version__}, {platform.machine()} "
          f"({platform.processor() or 'cpu'})")
    print(f"corpus: {len(lengths):,} documents, {tokens_per_epoch:,} tokens (mean {tokens_per_epoch / len(lengths):.0f},"
          f" max {int(lengths.max()):,}); generated in {t_data:.1f} s, RSS {rss_data:.0f} MiB")
    print(f"request: {num_samples:,} samples of {S} tokens -> {epochs} epoch(s), separate final epoch: {separate}")
    for name, seconds in times.items():
        print(f"  {name:15s} {seconds:7.2f} s")
    print(f"index build: {build:.2f} s for {total:,} samples ({total / build / 1e6:.2f} M samples/s); "
          f"indices {index_mib:.0f} MiB; peak RSS {_peak_rss_mib():.0f} MiB")
    print(f"goal < 30 s: {'met' if build < 30 else 'NOT met'}")


if __name__ == "__main__":
    main()
