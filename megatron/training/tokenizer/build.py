"""Build the tokenizer named by --tokenizer-type and compute the padded vocabulary."""

from __future__ import annotations

import logging
import math

from megatron.training.tokenizer.null_tokenizer import NullTokenizer

logger = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of divisible_by * TP, as Megatron does.

    Padding keeps the output GEMM shapes friendly and makes the vocab split evenly over
    tensor-parallel ranks.
    """
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_tokenizer(args):
    """Return the tokenizer for ``args.tokenizer_type``."""
    kind = args.tokenizer_type
    if kind == "NullTokenizer":
        tokenizer = NullTokenizer(
            args.vocab_size,
            eod_id=getattr(args, "null_tokenizer_eod_id", None),
            pad_id=getattr(args, "null_tokenizer_pad_id", -1),
        )
    else:
        raise ValueError(
            f"--tokenizer-type {kind} is not available in this build; use NullTokenizer "
            "(with --vocab-size) for mock data"
        )
    logger.info("tokenizer: %s, vocab size %d", kind, tokenizer.vocab_size)
    return tokenizer
