"""SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer (--tokenizer-model X.model).

At Megatron-LM HEAD the three types share one wrapper around the ``sentencepiece`` package:
ids are ``encode_as_ids(text)`` (no BOS/EOS added), no tokens are added, and eod = eos.
With --tokenizer-sentencepiece-legacy, --tokenizer-special-tokens are recognised literally in
the text; those missing from the model get new ids after its last piece.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer, require_package, split_on_specials

SPM_SEPARATOR = "\u2581"  # the word-boundary marker that SentencePiece puts before words


def _optional_id(value: int) -> Optional[int]:
    """SentencePiece reports an absent bos/eos/pad/unk piece as -1."""
    return None if value is None or value < 0 else int(value)


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece model; the special ids are the model's own (None where absent, pad -1).

    ``legacy=True`` with ``special_tokens`` reproduces Megatron's legacy mode: text between
    special tokens is encoded separately, a leading separator piece right after a special token
    is dropped (chat templates put a space there), and unknown specials are appended to the
    vocabulary. Special tokens named ``<cls>``/``<sep>``/``<mask>``/``<pad>`` etc. are not
    given roles; use ``token_to_id``.
    """

    def __init__(self, model_file: str, legacy: bool = False, special_tokens: Optional[List[str]] = None):
        options = {"legacy": legacy} if legacy else {}
        if special_tokens:
            options["special_tokens"] = list(special_tokens)
        super().__init__(model_file, **options)
        if special_tokens and not legacy:
            raise ValueError(
                f"--tokenizer-special-tokens {special_tokens} needs --tokenizer-sentencepiece-legacy with "
                f"{type(self).__name__}: at HEAD the SentencePiece wrapper adds no tokens; add the flag "
                "or drop the special tokens"
            )
        spm = require_package("sentencepiece", "sentencepiece", type(self).__name__)
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self._n_pieces = self._sp.get_piece_size()
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._n_pieces)}
        self._added: Dict[str, int] = {}
        self._added_ids: Dict[int, str] = {}
        self._legacy = legacy
        for tok in special_tokens or []:
            if tok in self._added:
                continue
            i = self._sp.piece_to_id(tok)
            if i == self._sp.unk_id() and tok != self._sp.id_to_piece(i):
                i = self._n_pieces + len([t for t in self._added.values() if t >= self._n_pieces])
                self._vocab[tok] = i
            self._added[tok] = i
            self._added_ids[i] = tok
        self._sep_id = self._sp.piece_to_id(SPM_SEPARATOR)

    def tokenize(self, text: str) -> List[int]:
        if not self._added:
            return self._sp.encode_as_ids(text)
        ids: List[int] = []
        for segment, special_id in split_on_specials(text, self._added):
            if special_id is not None:
                ids.append(special_id)
                continue
            piece_ids = self._sp.encode_as_ids(segment)
            if ids and ids[-1] in self._added_ids and piece_ids and piece_ids[0] == self._sep_id:
                piece_ids = piece_ids[1:]
            ids.extend(piece_ids)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if not self._added:
            return self._sp.decode_ids(ids)
        parts, start = [], 0
        for k, i in enumerate(ids):
            if i in self._added_ids:
                parts.append(self._sp.decode_ids(ids[start:k]))
                parts.append(self._added_ids[i])
                start = k + 1
        parts.append(self._sp.decode_ids(ids[start:]))
        return " ".join(p for p in parts if p)

    def token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._sp.unk_id())

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        """Ids of the legacy special tokens other than the model's bos, eos, pad and unk."""
        standard = {self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id(), self._sp.unk_id()}
        return [i for i in self._added.values() if i not in standard]

    @property
    def bos(self) -> Optional[int]:
        return _optional_id(self._sp.bos_id())

    @property
    def eos(self) -> Optional[int]:
        return _optional_id(self._sp.eos_id())

    @property
    def eod(self) -> Optional[int]:
        return self.eos

    @property
    def pad(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk(self) -> Optional[int]:
        return _optional_id(self._sp.unk_id())


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Same behaviour as SentencePieceTokenizer at HEAD; a separate name for the cache hash."""


class Llama2Tokenizer(SentencePieceTokenizer):
    """Same behaviour at HEAD (no BOS is prepended, unlike Megatron <= v0.15's Llama2Tokenizer)."""
