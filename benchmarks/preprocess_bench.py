"""Whole-command wall time of tools/preprocess_data.py, as a user runs it.

Usage: python benchmarks/preprocess_bench.py [--assets ../shared/assets] [--corpus brown]
                                             [--workers 1 2] [--repeats 3]

Runs ``preprocess_data.py --tokenizer-type GPT2BPETokenizer --append-eod`` on the corpus once
per worker count and repeat, in a fresh process each time (start-up, tokenizer loading and
writing included), and prints the best and median wall time, tokens/s, the CPU time of the
command, and whether every run wrote byte-identical .bin/.idx files. Reference on a 2-core
machine: Megatron-LM's own tool took 8.1 s (1 worker) and 6.9 s (2 workers) on brown.jsonl;
the goal is under 3.5 s with 2 workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _digest(prefix: str) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        h.update(Path(prefix + ext).read_bytes())
    return h.hexdigest()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(corpus: Path, assets: Path, workers: int, out_dir: str) -> dict:
    prefix = os.path.join(out_dir, f"bench_w{workers}")
    command = [
        sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
        "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", str(assets / "tokenizers" / "gpt2" / "vocab.json"),
        "--merge-file", str(assets / "tokenizers" / "gpt2" / "merges.txt"),
        "--append-eod", "--workers", str(workers), "--log-interval", "1000000",
    ]
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed:\n{proc.stderr}")
    tokens = int(proc.stdout.split(" tokens in ")[0].rsplit(" ", 1)[-1])
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "digest": _digest(prefix + "_text_document")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--corpus", default="brown", help="brown or kjv (shared/assets/corpora/<name>.jsonl)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    corpus = args.assets / "corpora" / f"{args.corpus}.jsonl"
    print(f"# preprocess_data.py on {corpus.name} ({corpus.stat().st_size / 1e6:.1f} MB), GPT2BPETokenizer, "
          f"--append-eod; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    digests = set()
    with tempfile.TemporaryDirectory() as out_dir:
        for workers in args.workers:
            runs = [run_once(corpus, args.assets, workers, out_dir) for _ in range(args.repeats)]
            digests.update(r["digest"] for r in runs)
            walls = [r["wall"] for r in runs]
            best, median = min(walls), statistics.median(walls)
            tokens = runs[0]["tokens"]
            print(f"workers {workers}: best {best:.2f} s, median {median:.2f} s, {tokens / best:,.0f} tokens/s "
                  f"(best), CPU {statistics.median(r['cpu'] for r in runs):.2f} s, {tokens} tokens")
    print(f"outputs byte-identical across all runs: {len(digests) == 1}")


if __name__ == "__main__":
    main()
