"""BertWordPieceLowerCase / BertWordPieceCase: BERT's WordPiece from a vocab.txt.

Text is cleaned (control characters dropped, whitespace made plain spaces), CJK ideographs are
split off, and for the lower-case variant accents are stripped and letters lower-cased; it is
then split on whitespace and punctuation, and every word is cut greedily into the longest
vocabulary pieces (``##`` marks a continuation). This is Hugging Face's BertTokenizer
pipeline, which Megatron-LM uses at HEAD. Two backends give identical ids: Hugging Face
``tokenizers`` (Rust) and a pure-Python one with a word cache; by default ASCII text takes the
Python path (faster there) and other text the Rust one.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import unicodedata
from typing import Dict, Iterable, List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer, require_package, split_on_specials

logger = logging.getLogger(__name__)

STANDARD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT

# ASCII fast path: tab/newline/return become spaces, the other control characters vanish; in
# ASCII every character that is not a letter, digit, space or control is punctuation.
_ASCII_CLEAN = {c: None for c in list(range(32)) + [127]}
_ASCII_CLEAN.update({ord("\t"): " ", ord("\n"): " ", ord("\r"): " "})
_ASCII_WORDS = re.compile(r"[0-9A-Za-z]+|[^\s0-9A-Za-z]")


def load_wordpiece_vocab(vocab_file: str) -> Dict[str, int]:
    """One token per line; the id is the line number (0-based)."""
    vocab: Dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            tok = line.rstrip("\n").rstrip("\r")
            if tok and tok not in vocab:
                vocab[tok] = i
    return vocab


def _is_cjk(cp: int) -> bool:
    """CJK Unified Ideographs blocks (not Hangul or kana), which BERT splits into single characters."""
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or (ch.isspace() and unicodedata.category(ch)[0] != "C") or ch == "\x85"


def normalize_bert(text: str, lower_case: bool) -> str:
    """Clean, space out CJK ideographs, and (lower-case variant) strip accents and lower-case."""
    if text.isascii():
        text = text.translate(_ASCII_CLEAN)
        return text.lower() if lower_case else text
    out = []
    for ch in text:
        if ch in "\t\n\r":
            out.append(" ")
            continue
        if ch == "\x00" or ch == "\ufffd" or unicodedata.category(ch).startswith("C"):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = "".join(out)
    if lower_case:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = text.lower()
    return text


def pre_split(text: str) -> List[str]:
    """Split on whitespace, and make every punctuation character a word of its own."""
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    words: List[str] = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def wordpiece(word: str, vocab: Dict[str, int], unk_id: int) -> List[int]:
    """Greedy longest-match-first pieces of one word; any unmatched rest makes the whole word [UNK]."""
    if len(word) > MAX_WORD_CHARS:
        return [unk_id]
    ids, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while start < end:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            found = vocab.get(piece)
            if found is not None:
                break
            end -= 1
        if found is None:
            return [unk_id]
        ids.append(found)
        start = end
    return ids


def _rust_wordpiece(vocab: Dict[str, int], lower_case: bool, specials: List[str]):
    tk = require_package("tokenizers", "tokenizers", "BERT WordPiece's fast path")
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

    tok = tk.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_WORD_CHARS))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


class BertWordPieceTokenizer(MegatronTokenizer):
    """WordPiece tokenizer; ``lower_case`` selects BertWordPieceLowerCase vs BertWordPieceCase.

    Special ids come from the vocab: cls=[CLS], sep=[SEP], pad=[PAD], mask=[MASK], unk=[UNK].
    As at Megatron-LM HEAD (a Hugging Face BERT tokenizer) bos = cls and eos = eod = sep.
    ``extra_tokens`` (``<extra_id_i>`` sentinels, --tokenizer-special-tokens) are appended after
    the vocab unless present, and are reported by ``additional_special_tokens_ids``.
    ``tokenize`` adds no [CLS]/[SEP]. ``backend``: ``rust``, ``python``, or ``auto`` (ASCII text
    through Python, other text through Rust when ``tokenizers`` is installed).
    """

    def __init__(self, vocab_file: str, lower_case: bool = True, extra_tokens: Optional[List[str]] = None,
                 backend: str = "auto"):
        super().__init__(vocab_file, lower_case=lower_case, extra_tokens=list(extra_tokens or []))
        self.lower_case = lower_case
        base = load_wordpiece_vocab(vocab_file)
        missing = [t for t in STANDARD_SPECIALS if t not in base]
        if missing:
            raise ValueError(
                f"--vocab-file {vocab_file!r} lacks the BERT special tokens {missing}; "
                "pass a BERT WordPiece vocab.txt"
            )
        self._vocab = dict(base)
        self._specials: Dict[str, int] = {t: base[t] for t in STANDARD_SPECIALS}
        self._extra_ids: List[int] = []
        for tok in extra_tokens or []:
            if tok not in self._vocab:
                self._vocab[tok] = max(self._vocab.values()) + 1
            self._specials[tok] = self._vocab[tok]
            self._extra_ids.append(self._vocab[tok])
        self._inv = {i: t for t, i in self._vocab.items()}
        self._base = base
        self._unk = base["[UNK]"]
        if backend not in ("auto", "rust", "python"):
            raise ValueError(f"BertWordPieceTokenizer backend {backend!r} is not one of auto, rust, python")
        use_rust = backend == "rust" or (backend == "auto" and importlib.util.find_spec("tokenizers") is not None)
        self._rust = _rust_wordpiece(self._vocab, lower_case, list(self._specials)) if use_rust else None
        if self._rust is not None and self._rust.get_vocab_size(with_added_tokens=True) != len(self._vocab):
            raise ValueError(f"--vocab-file {vocab_file!r} has repeated or blank lines; ids would not match")
        # "auto" sends ASCII text to the Python path, whose word cache and ASCII shortcuts make it
        # ~3x faster than a Rust call per text there, and the rest to Rust (~2x faster there).
        self._ascii_to_python = backend == "auto"
        self.backend = "auto" if use_rust and backend == "auto" else ("rust" if use_rust else "python")
        self._word_cache: Dict[str, List[int]] = {}

    def _encode_plain(self, text: str) -> List[int]:
        ids: List[int] = []
        cache = self._word_cache
        for word in pre_split(normalize_bert(text, self.lower_case)):
            hit = cache.get(word)
            if hit is None:
                hit = wordpiece(word, self._base, self._unk)
                if len(cache) < 500_000:
                    cache[word] = hit
            ids.extend(hit)
        return ids

    def tokenize(self, text: str) -> List[int]:
        if self._rust is not None and not (self._ascii_to_python and text.isascii()):
            return self._rust.encode(text, add_special_tokens=False).ids
        ids: List[int] = []
        for segment, special_id in split_on_specials(text, self._specials):
            if special_id is None:
                ids.extend(self._encode_plain(segment))
            else:
                ids.append(special_id)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Pieces joined by spaces, with ``##`` continuations glued to the previous piece (lossy)."""
        text = " ".join(self._inv[int(i)] for i in ids)
        return text.replace(" ##", "").replace("##", "")

    @property
    def cls(self) -> int:
        return self._specials["[CLS]"]

    @property
    def sep(self) -> int:
        return self._specials["[SEP]"]

    @property
    def pad(self) -> int:
        return self._specials["[PAD]"]

    @property
    def mask(self) -> int:
        return self._specials["[MASK]"]

    @property
    def unk(self) -> int:
        return self._unk

    @property
    def bos(self) -> int:
        return self.cls

    @property
    def eos(self) -> int:
        return self.sep

    @property
    def eod(self) -> int:
        return self.sep
