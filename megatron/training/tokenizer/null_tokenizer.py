"""NullTokenizer: text is whitespace-separated integer ids (for mock data and tests)."""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer


class NullTokenizer(MegatronTokenizer):
    """Identity tokenizer over ``vocab_size`` ids.

    As in Megatron-LM (HEAD), the end-of-document id is ``--null-tokenizer-eod-id``,
    by default ``vocab_size - 1``, and the pad id is ``--null-tokenizer-pad-id`` (-1:
    no padding token). There are no other special tokens.
    """

    def __init__(self, vocab_size: int, eod_id: Optional[int] = None, pad_id: int = -1):
        super().__init__()
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 2, got {vocab_size!r}")
        self._vocab_size = int(vocab_size)
        self._eod = self._vocab_size - 1 if eod_id is None else int(eod_id)
        if not 0 <= self._eod < self._vocab_size:
            raise ValueError(
                f"--null-tokenizer-eod-id {self._eod} is outside the vocabulary 0..{self._vocab_size - 1}"
            )
        self._pad = int(pad_id)
        self._unique = {"class": type(self).__name__, "vocab_size": self._vocab_size}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        return {str(i): i for i in range(self._vocab_size)}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: str(i) for i in range(self._vocab_size)}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def tokenize(self, text: str) -> List[int]:
        return [int(tok) for tok in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)
