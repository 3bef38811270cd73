"""TikTokenizer: byte-level BPE ranks run by the ``tiktoken`` package, behind a block of special ids.

--tokenizer-model is Megatron's JSON list of ``{"rank", "token_bytes" (base64), "token_str"}``
(entry i has rank i; the first 256 are the single bytes 0..255 in order), or a ``.tiktoken``
file of ``base64 rank`` lines. Ids ``[0, num_special)`` are the special tokens; rank r gets
id ``r + num_special``; ranks at or above ``vocab_size - num_special`` are dropped.
"""

from __future__ import annotations

import base64
import json
from typing import Dict, Iterable, List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer, require_package

# Megatron-LM's split patterns for --tiktoken-pattern (its PATTERN_TIKTOKEN / _V2 strings).
# v1 (Mistral Tekken style): letters with at most one leading non-letter, single digits,
# punctuation runs, newlines. v2 (o200k style, without the contraction suffixes): cased words
# split at lower->upper case changes, single digits, punctuation runs with trailing newlines or '/'.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
DEFAULT_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
DEFAULT_VOCAB_SIZE = 2**17
FILLER_TEMPLATE = "<SPECIAL_{}>"


def _load_json_ranks(path: str) -> List[bytes]:
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"--tokenizer-model {path!r}: a TikTokenizer JSON file must hold a list of "
                         "{rank, token_bytes, token_str} objects")
    tokens = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"} or entry["rank"] != i:
            raise ValueError(f"--tokenizer-model {path!r}: entry {i} must be "
                             f"{{'rank': {i}, 'token_bytes': ..., 'token_str': ...}}, got {entry!r:.200}")
        tok = base64.b64decode(entry["token_bytes"])
        if i < 256 and tok != bytes([i]):
            raise ValueError(f"--tokenizer-model {path!r}: entry {i} must be the single byte {i} "
                             "(the first 256 entries are the bytes in order)")
        tokens.append(tok)
    return tokens


def _load_tiktoken_file(path: str) -> List[bytes]:
    by_rank: Dict[int, bytes] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                by_rank[int(rank)] = base64.b64decode(b64)
            except ValueError as err:
                raise ValueError(f"--tokenizer-model {path!r} line {n}: expected 'base64 rank' ({err})") from err
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"--tokenizer-model {path!r}: ranks must be 0..{len(by_rank) - 1} without gaps")
    return [by_rank[r] for r in range(len(by_rank))]


def load_ranked_tokens(path: str) -> List[bytes]:
    """Token bytes in rank order, from Megatron's JSON list or a ``.tiktoken`` file."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return _load_json_ranks(path) if head.startswith(b"[") else _load_tiktoken_file(path)


def special_token_list(special_tokens: Optional[List[str]], num_special: int) -> List[str]:
    """The ``num_special`` special tokens: the given (or default) list, then ``<SPECIAL_i>`` fillers."""
    tokens = list(special_tokens) if special_tokens else list(DEFAULT_SPECIAL_TOKENS)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"--tokenizer-special-tokens {tokens} has repeats; list each token once")
    missing = [t for t in DEFAULT_SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"--tokenizer-special-tokens {tokens} lacks {missing}; TikTokenizer needs "
                         f"all of {DEFAULT_SPECIAL_TOKENS} (in any order) among its special tokens")
    if len(tokens) > num_special:
        raise ValueError(f"--tiktoken-num-special-tokens {num_special} is smaller than the {len(tokens)} "
                         "special tokens given; raise it")
    tokens += [FILLER_TEMPLATE.format(i) for i in range(len(tokens), num_special)]
    if len(set(tokens)) != num_special:
        raise ValueError(f"--tokenizer-special-tokens {special_tokens} collide with the <SPECIAL_i> fillers")
    return tokens


class TikTokenizer(MegatronTokenizer):
    """Megatron's TikTokenizer. eod = eos = ``</s>``; the other roles are the default specials.

    ``tokenize`` recognises special-token strings in the text (as Megatron HEAD does with
    ``allowed_special="all"``). ``detokenize`` joins token bytes before UTF-8 decoding, so it
    is lossless for any text, and writes special tokens as their strings.
    """

    def __init__(self, path: str, pattern: str = "v2", vocab_size: Optional[int] = None,
                 num_special_tokens: int = 1000, special_tokens: Optional[List[str]] = None):
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else int(vocab_size)
        super().__init__(path, pattern=pattern, vocab_size=vocab_size, num_special_tokens=num_special_tokens,
                         special_tokens=special_tokens)
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern {pattern!r} is not one of v1, v2")
        if not 0 < num_special_tokens < vocab_size:
            raise ValueError(f"--tiktoken-num-special-tokens {num_special_tokens} must be > 0 and below "
                             f"--vocab-size {vocab_size}")
        tiktoken = require_package("tiktoken", "tiktoken", "TikTokenizer")
        self._specials = special_token_list(special_tokens, num_special_tokens)
        self._n_named = len(special_tokens) if special_tokens else len(DEFAULT_SPECIAL_TOKENS)
        self._num_special = num_special_tokens
        ranked = load_ranked_tokens(path)
        inner = vocab_size - num_special_tokens
        if len(ranked) < inner:
            raise ValueError(
                f"--vocab-size {vocab_size} needs {inner} BPE ranks after the {num_special_tokens} special ids, "
                f"but --tokenizer-model {path!r} has {len(ranked)}; use --vocab-size "
                f"{len(ranked) + num_special_tokens} or less"
            )
        ranked = ranked[:inner]
        self._vocab_size = vocab_size
        self._id_to_bytes = {i + num_special_tokens: tok for i, tok in enumerate(ranked)}
        ranks = {tok: i for i, tok in self._id_to_bytes.items()}
        if len(ranks) != len(ranked):
            raise ValueError(f"--tokenizer-model {path!r} lists the same token bytes twice")
        self._special_ids = {tok: i for i, tok in enumerate(self._specials)}
        self._enc = tiktoken.Encoding(
            name="megatron-tiktokenizer", pat_str=TIKTOKEN_PATTERNS[pattern], mergeable_ranks=ranks,
            special_tokens=self._special_ids,
        )
        self._vocab: Optional[Dict[str, int]] = None

    @property
    def encoding(self):
        """The underlying ``tiktoken.Encoding`` (ids already shifted)."""
        return self._enc

    def tokenize(self, text: str) -> List[int]:
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, ids: Iterable[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < self._num_special:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self._specials[i])
            else:
                buf.extend(self._id_to_bytes[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        """Token string (bytes decoded with replacement) -> id; specials first."""
        if self._vocab is None:
            vocab = dict(self._special_ids)
            for i, tok in self._id_to_bytes.items():
                vocab.setdefault(tok.decode("utf-8", errors="replace"), i)
            self._vocab = vocab
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        inv = {i: tok for i, tok in enumerate(self._specials)}
        inv.update({i: b.decode("utf-8", errors="replace") for i, b in self._id_to_bytes.items()})
        return inv

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        """Special ids other than unk, bos, eos and the fillers (as Megatron reports them)."""
        skip = {"<unk>", "<s>", "</s>"}
        return [i for i, tok in enumerate(self._specials[: self._n_named]) if tok not in skip]

    def _id(self, token: str) -> int:
        return self._special_ids[token]

    @property
    def unk(self) -> int:
        return self._id("<unk>")

    @property
    def bos(self) -> int:
        return self._id("<s>")

    @property
    def eos(self) -> int:
        return self._id("</s>")

    @property
    def eod(self) -> int:
        return self._id("</s>")

    @property
    def mask(self) -> int:
        return self._id("<mask>")

    @property
    def pad(self) -> int:
        return self._id("<pad>")

    @property
    def cls(self) -> int:
        return self._id("<cls>")

    @property
    def sep(self) -> int:
        return self._id("<sep>")
