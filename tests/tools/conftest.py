"""Shared fixtures of the tool tests: asset paths and small slices of the shared corpora."""

import os
from pathlib import Path

import pytest

def _find_assets() -> Path:
    """<root>/shared/assets in this checkout or a parent folder (as the tokenizer tests look)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "assets").is_dir():
            return parent / "shared" / "assets"
    return Path("shared") / "assets"  # absent: the fixtures skip


ASSETS = _find_assets()
GPT2_VOCAB = ASSETS / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = ASSETS / "tokenizers" / "gpt2" / "merges.txt"
BERT_VOCAB = ASSETS / "tokenizers" / "bert-base-uncased" / "vocab.txt"
NLTK_DATA = ASSETS / "nltk_data"
BROWN = ASSETS / "corpora" / "brown.jsonl"
KJV = ASSETS / "corpora" / "kjv.jsonl"

GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_VOCAB),
              "--merge-file", str(GPT2_MERGES)]
BERT_FLAGS = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(BERT_VOCAB)]


def _require_assets():
    if not BROWN.exists() or not GPT2_VOCAB.exists():
        pytest.skip(f"shared assets not found at {ASSETS}")


@pytest.fixture
def brown_slice(tmp_path):
    """The first 24 Brown files (~60k GPT-2 tokens) as a jsonl file."""
    _require_assets()
    path = tmp_path / "brown24.jsonl"
    with open(BROWN, "rb") as src:
        path.write_bytes(b"".join(src.readline() for _ in range(24)))
    return path


@pytest.fixture
def kjv_slice(tmp_path):
    """The first 30 chapters of the KJV (Genesis), short documents."""
    _require_assets()
    path = tmp_path / "kjv30.jsonl"
    with open(KJV, "rb") as src:
        path.write_bytes(b"".join(src.readline() for _ in range(30)))
    return path


@pytest.fixture
def offline_nltk(monkeypatch):
    """NLTK_DATA pointing at the shared punkt_tab data; any download attempt fails the test."""
    _require_assets()
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download must not be called"))
    if str(NLTK_DATA) not in nltk.data.path:
        monkeypatch.setattr(nltk.data, "path", [str(NLTK_DATA)] + list(nltk.data.path))
    return NLTK_DATA


def repo_root() -> str:
    return os.fspath(Path(__file__).resolve().parents[2])
