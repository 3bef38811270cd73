"""FP8 against bf16 on real text: the same ~125M GPT trained twice, same seed and data.

    python benchmarks/fp8_convergence.py                       # 300 steps, GPU, delayed recipe
    python benchmarks/fp8_convergence.py --recipe tensorwise --iters 300
    python benchmarks/fp8_convergence.py --cpu --tiny --iters 20   # the driver itself, FP8 emulated

The shipped corpus (examples/data/kjv_pentateuch.jsonl) is preprocessed once with the GPT-2
BPE files of examples/data/gpt2 into a temporary directory; ``--corpus FILE [FILE ...]``
preprocesses other JSONL files (a "text" field per line) instead, and ``--mock-data`` uses
mock data. The shipped corpus holds about 195k tokens: 300 steps of the default batch read it
about 50 times, so both runs learn it by heart and the comparison is one of memorization.
A larger corpus with ``--gbs`` small enough for one pass compares learning instead:

    python benchmarks/fp8_convergence.py --recipe tensorwise --gbs 8 --corpus a.jsonl b.jsonl

Each run is its own ``pretrain_gpt.py`` process with a wall-clock limit
(``--timeout``), logging the loss at every step. The report prints both curves' summary
(first loss, mean of the last 50 steps, final loss, ms/iter) and whether the FP8 mean of
the last 50 steps is within ``--tolerance`` (1%) of bf16's. Exit code 0 only then.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_bench import REPO, TIMED_OUT, _stream, environment, parse_log  # noqa: E402

DATA = REPO / "examples" / "data"
GPT_125M = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
            "--position-embedding-type", "learned_absolute"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--position-embedding-type", "learned_absolute"]


def preprocess(work: Path, corpus: Sequence[Path] = ()) -> List[str]:
    """The --data-path and tokenizer flags of ``corpus`` (JSONL files, default the shipped
    one), preprocessed into ``work`` as one dataset."""
    source = DATA / "kjv_pentateuch.jsonl"
    if corpus:
        source = work / "corpus.jsonl"
        with open(source, "wb") as out:
            for path in corpus:
                data = Path(path).read_bytes()
                out.write(data if data.endswith(b"\n") or not data else data + b"\n")
    tokenizer = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(DATA / "gpt2" / "vocab.json"),
                 "--merge-file", str(DATA / "gpt2" / "merges.txt")]
    prefix = work / "corpus"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                    "--input", str(source), "--output-prefix", str(prefix),
                    "--append-eod", "--workers", "2"] + tokenizer, cwd=REPO, check=True, timeout=600)
    return ["--data-path", f"{prefix}_text_document", "--split", "98,2,0",
            "--data-cache-path", str(work / "cache")] + tokenizer


def train_flags(opts, data_flags: Sequence[str]) -> List[str]:
    flags = list(TINY if opts.tiny else GPT_125M) + [
        "--seq-length", str(opts.seq), "--max-position-embeddings", str(opts.seq),
        "--micro-batch-size", str(opts.mbs), "--global-batch-size", str(opts.gbs),
        "--train-iters", str(opts.iters), "--lr", "6e-4", "--min-lr", "6e-5", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, opts.iters // 20)), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "1234",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
    ] + list(data_flags)
    flags += ["--distributed-backend", "gloo"] if opts.cpu else ["--bf16"]
    return flags


def run(name: str, flags: Sequence[str], opts, work: Path):
    log_path = work / f"{name}.log"
    print(f"== {name}  (log: {log_path})", flush=True)
    rc, text = _stream([sys.executable, str(REPO / "pretrain_gpt.py")] + list(flags), log_path, True, opts.timeout)
    lines = [l for l in parse_log(text).lines if l.loss is not None]
    status = "ok" if rc == 0 else (f"stopped after --timeout {opts.timeout:g} s" if rc == TIMED_OUT
                                   else f"exit code {rc}")
    if rc not in (0, TIMED_OUT):
        print("\n".join(text.splitlines()[-15:]), file=sys.stderr)
    return status, lines


def summary(name: str, status: str, lines) -> Optional[float]:
    if not lines:
        print(f"{name:<22} no loss lines ({status})")
        return None
    losses = [l.loss for l in lines]
    tail = losses[-50:]
    ms = statistics.median(l.ms_per_iter for l in lines[len(lines) // 5:] or lines)
    mean = statistics.fmean(tail)
    print(f"{name:<22} steps {len(losses):>4}  first {losses[0]:.4f}  last-{len(tail)} mean {mean:.4f}  "
          f"final {losses[-1]:.4f}  ms/iter {ms:.1f}  {status}")
    return mean


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["delayed", "tensorwise"], default="delayed")
    p.add_argument("--format", choices=["hybrid", "e4m3"], default="hybrid")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--gbs", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.01, help="relative, on the last-50 mean loss")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS", help="per run")
    p.add_argument("--mock-data", action="store_true", help="mock data instead of the shipped corpus")
    p.add_argument("--corpus", nargs="+", type=Path, default=(), metavar="JSONL",
                   help="JSONL files (one {\"text\": ...} per line) to train on instead of the shipped corpus")
    p.add_argument("--cpu", action="store_true", help="fp32 on CPU, FP8 emulated (checks the driver, slowly)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model instead of ~125M")
    p.add_argument("--extra", default="", help="raw pretrain_gpt.py flags appended to both runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_cli(argv)
    for path in opts.corpus:
        if not path.is_file():
            raise SystemExit(f"--corpus {path}: no such file")
    with tempfile.TemporaryDirectory(prefix="fp8-convergence-") as tmp:
        work = Path(tmp)
        data_flags = (["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50257"]
                      if opts.mock_data else preprocess(work, opts.corpus))
        base = train_flags(opts, data_flags) + opts.extra.split()
        fp8 = ["--fp8-format", opts.format, "--fp8-recipe", opts.recipe] + (["--fp8-emulation"] if opts.cpu else [])
        reference = run("bf16" if not opts.cpu else "fp32", base, opts, work)
        candidate = run(f"fp8-{opts.recipe}", base + fp8, opts, work)
        print()
        print(" | ".join(f"{k} {v}" for k, v in environment().items()))
        ref_mean = summary("bf16" if not opts.cpu else "fp32", *reference)
        fp8_mean = summary(f"fp8-{opts.recipe} ({opts.format})", *candidate)
    if ref_mean is None or fp8_mean is None:
        return 1
    rel = (fp8_mean - ref_mean) / ref_mean
    ok = abs(rel) <= opts.tolerance and reference[0] == candidate[0] == "ok"
    print(f"FP8 last-50 mean loss vs reference: {rel * 100:+.2f}% (tolerance {opts.tolerance * 100:.1f}%): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
