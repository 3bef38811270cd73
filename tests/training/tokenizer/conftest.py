"""Fixtures for the tokenizer tests: the offline assets under <root>/shared/assets."""

import json
from pathlib import Path

import pytest

N_DOCS = 200  # first documents of each corpus compared against the reference libraries


def _find_assets():
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "assets"
        if candidate.is_dir():
            return candidate
    return None


ASSETS = _find_assets()


@pytest.fixture(scope="session")
def assets() -> Path:
    if ASSETS is None:
        pytest.skip("shared/assets not found beside the repository (need <root>/shared/assets with tokenizer files)")
    return ASSETS


def _load_corpus(path: Path, n: int):
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == n:
                break
    return docs


# Odd inputs every family must agree with its reference on: accents, CJK, emoji, control
# characters, runs of spaces and newlines, digits, contractions, leading/trailing blanks.
EDGE_TEXTS = [
    "",
    " ",
    "Hello world, this is a test.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Héllo naïve café Ünïcödé ÀÉÎÕÜ",
    "中文字符 and 日本語 mixed",
    "emoji 🎉🚀 and symbols ©®™ §¶",
    "don't won't it's we'll they've I'm she'd",
    "numbers 1234567 3.14159 1,000,000",
    "weird\u00a0nbsp\u2003em-space\u200bzero-width",
    "control\x07bell\x1bescape",
]


@pytest.fixture(scope="session")
def corpus_docs(assets):
    """First N_DOCS documents of brown and of kjv, plus the edge-case strings."""
    corpora = assets / "corpora"
    return (_load_corpus(corpora / "brown.jsonl", N_DOCS) + _load_corpus(corpora / "kjv.jsonl", N_DOCS)
            + EDGE_TEXTS)
