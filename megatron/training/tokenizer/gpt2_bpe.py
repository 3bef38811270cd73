"""GPT2BPETokenizer: GPT-2 byte-level BPE from vocab.json and merges.txt.

Three backends give identical ids (tested on the corpora): ``tiktoken`` (Rust, ~1M tokens/s on
one core), Hugging Face ``tokenizers`` (Rust, ~150k tokens/s per call) and a pure-Python one
with a word cache. ``auto`` takes the fastest one installed, since the preprocessing tool must
exceed ~190k tokens/s per worker.
As in Megatron-LM at HEAD (a Hugging Face GPT-2 tokenizer), a literal ``<|endoftext|>`` in the
text is encoded as the end-of-document id, and so are tokens given by
--tokenizer-special-tokens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron.training.tokenizer.base import MegatronTokenizer, require_package, split_on_specials

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"

# GPT-2's pre-tokenization: English contractions, letter runs, digit runs and punctuation runs,
# each with at most one leading space, then whitespace (keeping the last space for the next word).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_BACKENDS = ("auto", "tiktoken", "rust", "python")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable-character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7f-0xa0,
    0xad) map, in byte order, to U+0100 onwards, so no vocabulary entry contains whitespace.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _compile_split_pattern():
    """The GPT-2 split regex; ``regex`` understands \\p{L}, the stdlib needs an equivalent."""
    try:
        import regex

        return regex.compile(GPT2_SPLIT_PATTERN)
    except ImportError:
        import re

        # Without \p classes: a letter is a word character that is neither a digit nor '_';
        # a "number" is a digit. Exact for ASCII; differs from GPT-2 only on rare Unicode
        # categories (e.g. No vs Nd), so the 'regex' package is recommended.
        letter, digit = r"[^\W\d_]", r"\d"
        pattern = (
            r"'s|'t|'re|'ve|'m|'ll|'d"
            rf"| ?{letter}+| ?{digit}+| ?(?:(?!{letter}|{digit})[^\s])+|\s+(?!\S)|\s+"
        )
        logger.warning("the 'regex' package is missing; GPT-2 splitting uses an approximation")
        return re.compile(pattern)


def load_gpt2_files(vocab_file: str, merge_file: str) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Read vocab.json (token -> id) and merges.txt (one ``left right`` pair per line, by rank)."""
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(merge_file, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            left, right = line.split(" ")
            merges.append((left, right))
    return vocab, merges


class PythonByteLevelBPE:
    """Pure-Python GPT-2 BPE over the byte-to-unicode alphabet, with a per-word cache."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]):
        self.encoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.split_re = _compile_split_pattern()
        # Map each UTF-8 byte straight to its printable character in one translate() call.
        self._byte_table = [self.byte_encoder[b] for b in range(256)]
        self.cache: Dict[str, List[int]] = {}

    def _merge(self, word: str) -> List[str]:
        """Apply merges to one pre-token, lowest rank first, until none applies."""
        parts = list(word)
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            left, right = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        cache, table, encoder = self.cache, self._byte_table, self.encoder
        for piece in self.split_re.findall(text):
            hit = cache.get(piece)
            if hit is None:
                word = "".join(table[b] for b in piece.encode("utf-8"))
                hit = [encoder[tok] for tok in self._merge(word)]
                if len(cache) < 1_000_000:
                    cache[piece] = hit
            ids.extend(hit)
        return ids


def _rust_tokenizer(vocab: Dict[str, int], merges: List[Tuple[str, str]]):
    """The same BPE through Hugging Face ``tokenizers``: byte-level split and decoder, no prefix space."""
    tk = require_package("tokenizers", "tokenizers", "GPT2BPETokenizer's fast path")
    from tokenizers import decoders, models, pre_tokenizers

    tok = tk.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tiktoken_ranks(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]) -> Optional[Dict[bytes, int]]:
    """GPT-2 files as tiktoken ``mergeable_ranks`` (token bytes -> id), or None if not equivalent.

    tiktoken merges the adjacent pair whose joined bytes have the lowest id, while merges.txt
    BPE merges the pair listed first. The two agree when every merged token's id grows with
    its merge line and all 256 single bytes come first, as in GPT-2's own files; other files
    fall back to the ``tokenizers`` or Python backend.
    """
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    byte_ids = [vocab.get(c) for c in bytes_to_unicode().values()]
    if any(i is None for i in byte_ids) or max(byte_ids) >= 256:
        return None
    last = 255
    for left, right in merges:
        i = vocab.get(left + right)
        if i is None or i <= last:
            return None
        last = i
    ranks = {}
    for tok, i in vocab.items():
        if i <= last:
            try:
                ranks[bytes(decoder[c] for c in tok)] = i
            except KeyError:
                return None
    if len(ranks) != last + 1:
        return None
    return ranks


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2 BPE. ``backend``: ``auto`` (tiktoken, else ``tokenizers``, else Python), or one of
    ``tiktoken``, ``rust``, ``python``; the chosen one is in ``self.backend``.

    Special ids: eod = bos = eos = unk = ``<|endoftext|>`` (50256 for GPT-2's files); GPT-2 has
    no pad (-1), cls, sep or mask (None). ``special_tokens`` (from
    --tokenizer-special-tokens) are appended after the base vocabulary unless already in it.
    """

    def __init__(self, vocab_file: str, merge_file: str, special_tokens: Optional[List[str]] = None,
                 backend: str = "auto"):
        super().__init__(vocab_file, merge_file, **({"special_tokens": list(special_tokens)} if special_tokens else {}))
        if backend not in _BACKENDS:
            raise ValueError(f"GPT2BPETokenizer backend {backend!r} is not one of {_BACKENDS}")
        vocab, merges = load_gpt2_files(vocab_file, merge_file)
        self._vocab = dict(vocab)
        self._base_size = len(vocab)
        self._added: Dict[str, int] = {}
        for tok in [EOD_TOKEN] + list(special_tokens or []):
            if tok not in self._vocab:
                self._vocab[tok] = len(self._vocab)
            self._added[tok] = self._vocab[tok]
        self._eod = self._added[EOD_TOKEN]
        self._extra_ids = [self._added[t] for t in (special_tokens or []) if t != EOD_TOKEN]
        self._inv = {i: t for t, i in self._vocab.items()}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

        self.backend = self._pick_backend(backend, vocab, merges)
        logger.info("GPT2BPETokenizer: %s backend, %d tokens", self.backend, len(self._vocab))

    def _pick_backend(self, backend: str, vocab, merges) -> str:
        self._tiktoken = self._rust = self._python = None
        if backend in ("auto", "tiktoken") and (backend == "tiktoken" or _installed("tiktoken")):
            tiktoken = require_package("tiktoken", "tiktoken", "GPT2BPETokenizer's tiktoken backend")
            ranks = tiktoken_ranks(vocab, merges)
            if ranks is not None and min(self._added.values()) >= len(ranks):
                self._tiktoken = tiktoken.Encoding(
                    name="megatron-gpt2-bpe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                    special_tokens=dict(self._added),
                )
                return "tiktoken"
            if backend == "tiktoken":
                raise ValueError(
                    "GPT2BPETokenizer: these --vocab-file/--merge-file files do not have GPT-2's "
                    "id order, so the tiktoken backend cannot reproduce them; use backend 'rust' or 'python'"
                )
        if backend == "rust" or (backend == "auto" and _installed("tokenizers")):
            from tokenizers import AddedToken

            self._rust = _rust_tokenizer(vocab, merges)
            self._rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self._added])
            return "rust"
        self._python = PythonByteLevelBPE(vocab, merges)
        return "python"

    def tokenize(self, text: str) -> List[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode(text, allowed_special="all")
        if self._rust is not None:
            return self._rust.encode(text, add_special_tokens=False).ids
        ids: List[int] = []
        for segment, special_id in split_on_specials(text, self._added):
            if special_id is None:
                ids.extend(self._python.encode(segment))
            else:
                ids.append(special_id)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Inverse of ``tokenize``: bytes of the BPE tokens are joined, then decoded as UTF-8."""
        out, buf = [], bytearray()
        base, inv, dec = self._base_size, self._inv, self._byte_decoder
        for i in ids:
            i = int(i)
            tok = inv[i]
            if i >= base or tok in self._added:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(tok)
            else:
                buf.extend(dec[c] for c in tok)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def unk(self) -> int:
        return self._eod
