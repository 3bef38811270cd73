"""HuggingFaceTokenizer: a local Hugging Face tokenizer directory through transformers.AutoTokenizer.

The network is never used (``local_files_only=True``): --tokenizer-model must be a directory
holding the tokenizer files (tokenizer.json / tokenizer_config.json / vocab files).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer, require_package


class HuggingFaceTokenizer(MegatronTokenizer):
    """Wraps ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.

    ``include_special_tokens`` (Megatron's default; off with
    --tokenizer-hf-no-include-special-tokens) makes ``tokenize`` return what the tokenizer's
    ``__call__`` returns, e.g. with a BOS id in front; otherwise no special tokens are added.
    Missing roles follow Megatron: eos falls back to sep and bos to cls (and back), eod = eos.
    """

    def __init__(self, path: str, use_fast: bool = True, include_special_tokens: bool = True,
                 trust_remote_code: bool = False, additional_special_tokens: Optional[List[str]] = None,
                 vocab_file: Optional[str] = None, merge_file: Optional[str] = None):
        options = {"use_fast": use_fast, "include_special_tokens": include_special_tokens}
        if additional_special_tokens:
            options["additional_special_tokens"] = list(additional_special_tokens)
        super().__init__(path, **options)
        transformers = require_package("transformers", "transformers", "HuggingFaceTokenizer")
        kwargs = dict(local_files_only=True, use_fast=use_fast, trust_remote_code=trust_remote_code)
        if vocab_file:
            kwargs["vocab_file"] = vocab_file
        if merge_file:
            kwargs["merges_file"] = merge_file
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        except Exception as err:  # transformers raises OSError, ValueError or others for a bad directory
            raise ValueError(
                f"--tokenizer-model {path!r}: transformers.AutoTokenizer could not load a tokenizer from it "
                f"without the network ({err}); pass a local directory with tokenizer.json or "
                "tokenizer_config.json and its vocabulary files"
            ) from err
        if additional_special_tokens:
            self._tok.add_special_tokens({"additional_special_tokens": list(additional_special_tokens)})
        self._extra = list(additional_special_tokens or [])
        self._include_special = include_special_tokens

    @property
    def hf_tokenizer(self):
        """The underlying ``transformers`` tokenizer."""
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        if self._include_special:
            return list(self._tok(text)["input_ids"])
        return list(self._tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab()

    @property
    def additional_special_tokens_ids(self) -> List[int]:
        return [self._tok.convert_tokens_to_ids(t) for t in self._extra]

    def _role(self, *names: str) -> Optional[int]:
        for name in names:
            value = getattr(self._tok, f"{name}_token_id", None)
            if value is not None:
                return int(value)
        return None

    @property
    def cls(self) -> Optional[int]:
        return self._role("cls", "bos")

    @property
    def sep(self) -> Optional[int]:
        return self._role("sep", "eos")

    @property
    def pad(self) -> int:
        value = self._role("pad")
        return -1 if value is None else value

    @property
    def bos(self) -> Optional[int]:
        return self._role("bos", "cls")

    @property
    def eos(self) -> Optional[int]:
        return self._role("eos", "sep")

    @property
    def eod(self) -> Optional[int]:
        return self.eos

    @property
    def mask(self) -> Optional[int]:
        return self._role("mask")

    @property
    def unk(self) -> Optional[int]:
        return self._role("unk")
