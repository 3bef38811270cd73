"""A Hugging Face tokenizer directory for SFT tests: GPT-2's BPE from the shared test assets,
with ChatML's turn markers (and any other special tokens) added."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import pytest


def _find_gpt2() -> Optional[Path]:
    # The offline assets sit beside the repository, as for the tokenizer tests.
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "assets" / "tokenizers" / "gpt2"
        if candidate.is_dir():
            return candidate
    return None

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder, chat_template: Optional[str] = None, specials: Optional[List[str]] = None) -> str:
    """Save the tokenizer into ``folder`` and return its path."""
    from transformers import GPT2TokenizerFast

    gpt2 = _find_gpt2()
    if gpt2 is None:
        pytest.skip("shared/assets/tokenizers/gpt2 not found beside the repository")
    with open(os.path.join(gpt2, "vocab.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)
    with open(os.path.join(gpt2, "merges.txt"), encoding="utf-8") as handle:
        merges = [tuple(line.split()) for line in handle.read().splitlines()[1:] if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + list(specials or [])})
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(folder))
    return str(folder)
