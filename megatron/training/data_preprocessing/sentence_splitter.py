"""Sentence splitting for --split-sentences: NLTK punkt, offline.

Megatron-LM loads ``tokenizers/punkt/<lang>.pickle`` and calls ``nltk.download`` first; nltk
3.9+ reads only the ``punkt_tab`` format and a download needs the network. Here the punkt_tab
model is looked up in NLTK's data path (``NLTK_DATA`` included) and in the project's
``shared/assets/nltk_data``; nothing is downloaded, and a missing model is an error that gives
the command that installs it. The sentences are the ones Megatron's splitter produces with the
same nltk: the same parameters, text cut into 1,000,000-character chunks, and for
--keep-newlines the same period-context expression (whitespace after a sentence end stays
with the sentence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Sequence

CHUNK_CHARS = 1_000_000  # Megatron splits each text in chunks of this many characters

Splitter = Callable[[str], List[str]]


def identity_splitter(text: str) -> List[str]:
    """No splitting: the whole text is one sequence."""
    return [text]


def default_data_dirs() -> List[str]:
    """Extra nltk data directories tried after NLTK's own path: the project's shared assets."""
    root = Path(__file__).resolve().parents[3]
    candidates = [root / "shared" / "assets" / "nltk_data", root.parent / "shared" / "assets" / "nltk_data"]
    return [str(p) for p in candidates if p.is_dir()]


def _missing_model_message(lang: str, searched: Sequence[str]) -> str:
    return (
        f"--split-sentences needs NLTK's punkt_tab model for --lang {lang}, and it was not found in "
        f"{', '.join(searched) or 'any nltk data directory'}. Install it (needs the network once):\n"
        f"    python -m nltk.downloader -d ~/nltk_data punkt_tab\n"
        f"or point NLTK_DATA at a directory holding tokenizers/punkt_tab/{lang}/ "
        f"(NLTK_DATA=/path/to/nltk_data python tools/preprocess_data.py ...)"
    )


def _load_punkt(lang: str):
    """The punkt sentence tokenizer for ``lang`` from local data; ValueError if it is absent."""
    try:
        import nltk.data
        from nltk.tokenize import punkt
    except ImportError:
        raise ValueError("--split-sentences needs the 'nltk' package: pip install nltk") from None
    for directory in reversed(default_data_dirs()):
        if directory not in nltk.data.path:
            nltk.data.path.append(directory)
    try:
        if hasattr(punkt, "PunktTokenizer"):
            return punkt.PunktTokenizer(lang)
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")  # nltk < 3.8.2 only has pickles
    except LookupError:
        raise ValueError(_missing_model_message(lang, [str(p) for p in nltk.data.path])) from None


def _keep_newlines_tokenizer(base):
    """A punkt tokenizer with ``base``'s parameters whose sentences keep trailing whitespace."""
    from nltk.tokenize import punkt

    class KeepWhitespaceLanguageVars(punkt.PunktLanguageVars):
        # The stock expression needs whitespace before the next token, so the boundary falls
        # before it and the whitespace is dropped; "\s*" inside the match keeps it in the
        # sentence. The leading "\S*" is part of Megatron's expression and is kept so the
        # boundaries are the same as Megatron's.
        _period_context_fmt = r"""
            \S*
            %(SentEndChars)s
            \s*
            (?=(?P<after_tok>
                %(NonWord)s
                |
                (?P<next_tok>\S+)
            ))"""

    tokenizer = punkt.PunktSentenceTokenizer(lang_vars=KeepWhitespaceLanguageVars())
    tokenizer._params = base._params
    return tokenizer


def build_splitter(split_sentences: bool, lang: str = "english", keep_newlines: bool = False) -> Splitter:
    """The function that cuts one text into sentences (identity without --split-sentences)."""
    if not split_sentences:
        return identity_splitter
    tokenizer = _load_punkt(lang)
    if keep_newlines:
        tokenizer = _keep_newlines_tokenizer(tokenizer)

    def split(text: str) -> List[str]:
        sentences: List[str] = []
        for start in range(0, len(text), CHUNK_CHARS):
            sentences.extend(tokenizer.tokenize(text[start:start + CHUNK_CHARS]))
        return sentences

    return split

