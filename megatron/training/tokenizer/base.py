"""The interface every tokenizer selected by --tokenizer-type implements."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional


def require_package(module: str, pip_name: str, purpose: str):
    """Import an optional dependency, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the '{pip_name}' package: pip install {pip_name} "
            "(or install this project with the 'tokenizers' extra: pip install -e .[tokenizers])"
        ) from err


def check_file(flag: str, path: Optional[str], tokenizer_type: str, want_dir: bool = False) -> str:
    """Return ``path`` if it names an existing file (or directory); else raise ValueError naming the flag."""
    kind = "directory" if want_dir else "file"
    if not path:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag} (the tokenizer {kind}); it was not given")
    ok = os.path.isdir(path) if want_dir else os.path.isfile(path)
    if not ok:
        raise ValueError(
            f"{flag} {path!r} is not an existing {kind}; --tokenizer-type {tokenizer_type} reads it, "
            f"so pass the path of the {kind}"
            + (" (Hugging Face hub names are not downloaded: save the tokenizer to a local directory)"
               if want_dir else "")
        )
    return path


class MegatronTokenizer(ABC):
    """A text <-> token-id mapping with Megatron's special-id properties.

    Contract shared by all families:

    - ``tokenize(text) -> list[int]`` adds no special tokens of its own (no BOS/CLS/SEP);
      special-token strings that occur literally in the text are mapped to their ids where the
      family does so (GPT-2 ``<|endoftext|>``, added tokens, TikToken specials).
    - ``detokenize(ids) -> str`` is the inverse for lossless families (GPT-2, TikToken).
    - ``vocab_size`` counts every id the tokenizer can emit (base vocabulary plus added tokens);
      the model pads it further, see ``build.padded_vocab_size``.
    - The special-id properties ``cls, sep, eod, bos, eos, mask, unk`` return an ``int``, or
      ``None`` where the family has no such token. ``pad`` is the exception: where there is no
      pad token it is -1, Megatron's "no padding token" value that the datasets test with
      ``pad >= 0`` (SentencePiece's own ``pad_id()`` and NullTokenizer use it too).
    - ``unique_identifiers`` is an ordered dict of strings (class, file paths, options) that the
      dataset cache hashes, so two tokenizers that can produce different ids never share a cache.
    """

    def __init__(self, *paths: str, **options):
        self._unique = OrderedDict()
        self._unique["class"] = type(self).__name__
        self._unique["tokenizer_path"] = [str(p) for p in paths]
        for key, value in options.items():
            self._unique[key] = str(value)
        # Families that hold their vocabulary as a dict fill these in; the shared properties
        # below read them, so a family overrides only what it computes some other way.
        self._vocab: Optional[Dict[str, int]] = None
        self._inv: Optional[Dict[int, str]] = None
        self._extra_ids: List[int] = []

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` into token ids."""

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode token ids into text."""

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (unpadded)."""
        return len(self.vocab)

    @property
    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""
        if self._vocab is None:
            raise NotImplementedError(f"{type(self).__name__} sets no vocabulary dict; it must override vocab")
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string, built once: the vocabulary does not change after construction."""
        if self._inv is None:
            self._inv = {i: tok for tok, i in self.vocab.items()}
        return self._inv

    @property
    def unique_identifiers(self) -> OrderedDict[str, object]:
        return self._unique

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        """Ids of added tokens other than the standard ones (e.g. T5 ``<extra_id_i>`` sentinels)."""
        return list(self._extra_ids)

    @property
    def cls(self) -> Optional[int]:
        return None

    @property
    def sep(self) -> Optional[int]:
        return None

    @property
    def pad(self) -> int:
        return -1

    @property
    def eod(self) -> Optional[int]:
        return None

    @property
    def bos(self) -> Optional[int]:
        return None

    @property
    def eos(self) -> Optional[int]:
        return None

    @property
    def mask(self) -> Optional[int]:
        return None

    @property
    def unk(self) -> Optional[int]:
        return None

    # NeMo / Megatron-Core spellings of the same ids.
    @property
    def eod_id(self) -> Optional[int]:
        return self.eod

    @property
    def bos_id(self) -> Optional[int]:
        return self.bos

    @property
    def eos_id(self) -> Optional[int]:
        return self.eos

    @property
    def pad_id(self) -> Optional[int]:
        return self.pad

    @property
    def mask_id(self) -> Optional[int]:
        return self.mask

    def text_to_ids(self, text: str) -> List[int]:
        return self.tokenize(text)

    def ids_to_text(self, ids: Iterable[int]) -> str:
        return self.detokenize(ids)

    def __call__(self, text: str) -> List[int]:
        return self.tokenize(text)


def split_on_specials(text: str, specials: Dict[str, int]):
    """Yield ``(segment, None)`` for ordinary text and ``(token, id)`` for special-token matches.

    Matching is literal, leftmost first and, at one position, longest first, which is how
    Hugging Face's added-vocabulary splitting and tiktoken treat special tokens.
    """
    if not specials:
        yield text, None
        return
    ordered = sorted(specials, key=len, reverse=True)
    pos = 0
    while pos < len(text):
        best_at, best_tok = -1, None
        for tok in ordered:
            at = text.find(tok, pos)
            if at != -1 and (best_at == -1 or at < best_at):
                best_at, best_tok = at, tok
        if best_tok is None:
            break
        if best_at > pos:
            yield text[pos:best_at], None
        yield best_tok, specials[best_tok]
        pos = best_at + len(best_tok)
    if pos < len(text):
        yield text[pos:], None
