"""Tokens per second of each tokenizer family and backend, one process, on a jsonl corpus.

Usage: python benchmarks/tokenizer_speed.py [--assets ../shared/assets] [--corpus brown] [--docs 500]

The preprocessing tool needs more than ~190k tokens/s per worker with GPT-2 BPE; the default
backends are chosen for that.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer
from megatron.training.tokenizer.gpt2_bpe import GPT2BPETokenizer


def _candidates(assets: Path):
    tk = assets / "tokenizers"
    gpt2 = (str(tk / "gpt2/vocab.json"), str(tk / "gpt2/merges.txt"))
    for backend in ("tiktoken", "rust", "python"):
        yield f"GPT2BPETokenizer[{backend}]", lambda b=backend: GPT2BPETokenizer(*gpt2, backend=b)
    for backend in ("auto", "rust", "python"):
        yield (f"BertWordPieceLowerCase[{backend}]",
               lambda b=backend: BertWordPieceTokenizer(str(tk / "bert-base-uncased/vocab.txt"), backend=b))
    try:
        from megatron.training.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        yield "SentencePieceTokenizer", lambda: SentencePieceTokenizer(str(tk / "sentencepiece/mistral-7b-v0.1.model"))
    except ImportError:
        pass
    try:
        from megatron.training.tokenizer.tiktokenizer import TikTokenizer

        yield "TikTokenizer[cl100k,v2]", lambda: TikTokenizer(
            str(tk / "tiktoken/9b5ad71b2ce5302211f9c61530b329a4922fc6a4"), vocab_size=101256)
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(Path(__file__).resolve().parents[2] / "shared" / "assets"))
    parser.add_argument("--corpus", default="brown", choices=["brown", "kjv"])
    parser.add_argument("--docs", type=int, default=500)
    args = parser.parse_args()
    assets = Path(args.assets)
    with open(assets / "corpora" / f"{args.corpus}.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(args.docs), f)]
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{len(docs)} {args.corpus} documents, one process, cold word caches")
    for name, make in _candidates(assets):
        try:
            tok = make()
        except ImportError as err:
            print(f"{name:34s} skipped ({err})")
            continue
        start = time.perf_counter()
        n = sum(len(tok.tokenize(d)) for d in docs)
        dt = time.perf_counter() - start
        print(f"{name:34s} {n:>9d} tokens  {n / dt:>12,.0f} tokens/s")


if __name__ == "__main__":
    main()
