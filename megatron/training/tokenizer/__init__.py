"""Tokenizers selected by --tokenizer-type.

Each family lives in its own module and is imported lazily by ``build_tokenizer``, so a missing
optional package (sentencepiece, tiktoken, tokenizers, transformers) only matters for the
families that need it.
"""

from megatron.training.tokenizer.base import MegatronTokenizer
from megatron.training.tokenizer.build import build_tokenizer, padded_vocab_size, vocab_size_with_padding
from megatron.training.tokenizer.null_tokenizer import NullTokenizer

__all__ = ["MegatronTokenizer", "NullTokenizer", "build_tokenizer", "padded_vocab_size", "vocab_size_with_padding"]
