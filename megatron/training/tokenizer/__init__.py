"""Tokenizers selected by --tokenizer-type."""

from megatron.training.tokenizer.build import build_tokenizer, padded_vocab_size

__all__ = ["build_tokenizer", "padded_vocab_size"]
