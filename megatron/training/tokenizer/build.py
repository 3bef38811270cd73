"""Build the tokenizer named by --tokenizer-type and compute the padded vocabulary.

Flags are read with ``getattr`` and Megatron's defaults, so a namespace that lacks a
tokenizer flag behaves as if the flag was not given.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional

from megatron.training.tokenizer.base import MegatronTokenizer, check_file

logger = logging.getLogger(__name__)

TEXT_TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "NullTokenizer",
    "SFTTokenizer",
)
UNSUPPORTED_TOKENIZER_TYPES = ("MultimodalTokenizer", "NullMultimodalTokenizer")
BERT_CASE_EXTRA_IDS = 100  # Megatron-LM HEAD always gives BertWordPieceCase 100 <extra_id_i> sentinels


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of divisible_by * TP, as Megatron does.

    Padding keeps the output GEMM shapes friendly and makes the vocab split evenly over
    tensor-parallel ranks. Example: GPT-2's 50257 -> 50304 at TP 1, 51200 at TP 8.
    """
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    if multiple < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by} times --tensor-model-parallel-size "
            f"{tensor_model_parallel_size} must be >= 1"
        )
    return int(math.ceil(vocab_size / multiple) * multiple)


def vocab_size_with_padding(orig_vocab_size: int, args) -> int:
    """The model's vocabulary size for a tokenizer of ``orig_vocab_size`` ids.

    --padded-vocab-size wins when given (it must hold every id); --no-pad-vocab-size keeps the
    tokenizer's size; otherwise ``padded_vocab_size`` with --make-vocab-size-divisible-by and TP.
    """
    # getattr throughout this module: tools/preprocess_data.py builds tokenizers from its own
    # parser, whose namespace has only the tokenizer flags it defines
    explicit = getattr(args, "padded_vocab_size", None)
    if explicit is not None:
        if explicit < orig_vocab_size:
            raise ValueError(
                f"--padded-vocab-size {explicit} is smaller than the tokenizer's {orig_vocab_size} ids; "
                f"pass at least {orig_vocab_size} or drop the flag"
            )
        return int(explicit)
    if not getattr(args, "pad_vocab_size", True) or getattr(args, "no_pad_vocab_size", False):
        return int(orig_vocab_size)
    return padded_vocab_size(
        orig_vocab_size,
        getattr(args, "make_vocab_size_divisible_by", 128),
        getattr(args, "tensor_model_parallel_size", 1),
    )


def _special_tokens(args) -> Optional[List[str]]:
    tokens = getattr(args, "tokenizer_special_tokens", None)
    if tokens is None:
        tokens = getattr(args, "tiktoken_special_tokens", None)
    return list(tokens) if tokens else None


def _extra_ids(count: int) -> List[str]:
    return [f"<extra_id_{i}>" for i in range(count)]


def _build_bert(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.bert_wordpiece import BertWordPieceTokenizer

    vocab_file = check_file("--vocab-file", getattr(args, "vocab_file", None), kind)
    if kind == "BertWordPieceCase":
        extra = _extra_ids(BERT_CASE_EXTRA_IDS)
        return BertWordPieceTokenizer(vocab_file, lower_case=False, extra_tokens=extra)
    extra = _extra_ids(getattr(args, "vocab_extra_ids", 0) or 0) + (_special_tokens(args) or [])
    return BertWordPieceTokenizer(vocab_file, lower_case=True, extra_tokens=extra)


def _build_gpt2(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.gpt2_bpe import GPT2BPETokenizer

    vocab_file = check_file("--vocab-file", getattr(args, "vocab_file", None), kind)
    merge_file = check_file("--merge-file", getattr(args, "merge_file", None), kind)
    return GPT2BPETokenizer(vocab_file, merge_file, special_tokens=_special_tokens(args))


def _build_sentencepiece(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer import sentencepiece_tokenizer as sp

    model = check_file("--tokenizer-model", getattr(args, "tokenizer_model", None), kind)
    legacy = bool(getattr(args, "tokenizer_sentencepiece_legacy", False))
    specials = _special_tokens(args) or []
    extra = getattr(args, "vocab_extra_ids", 0) or 0
    if extra and legacy:
        specials = specials + _extra_ids(extra)
    elif extra:
        logger.warning("--vocab-extra-ids %d is ignored by %s without --tokenizer-sentencepiece-legacy", extra, kind)
    return getattr(sp, kind)(model, legacy=legacy, special_tokens=specials or None)


def _build_huggingface(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    path = check_file("--tokenizer-model", getattr(args, "tokenizer_model", None), kind, want_dir=True)
    return HuggingFaceTokenizer(
        path,
        use_fast=getattr(args, "tokenizer_hf_use_fast", True),
        include_special_tokens=getattr(args, "tokenizer_hf_include_special_tokens", True),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        additional_special_tokens=_special_tokens(args),
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
    )


def _build_sft(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.sft_tokenizer import SFTTokenizer

    path = check_file("--tokenizer-model", getattr(args, "tokenizer_model", None), kind, want_dir=True)
    return SFTTokenizer(
        path,
        prompt_format=getattr(args, "sft_tokenizer_prompt_format", None) or "nemotron-h-aligned",
        chat_template=getattr(args, "chat_template", None),
        use_fast=getattr(args, "tokenizer_hf_use_fast", True),
        include_special_tokens=getattr(args, "tokenizer_hf_include_special_tokens", True),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        additional_special_tokens=_special_tokens(args),
    )


def _build_tiktoken(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.tiktokenizer import TikTokenizer

    model = check_file("--tokenizer-model", getattr(args, "tokenizer_model", None), kind)
    return TikTokenizer(
        model,
        pattern=getattr(args, "tiktoken_pattern", None) or "v2",
        vocab_size=getattr(args, "vocab_size", None),
        num_special_tokens=getattr(args, "tiktoken_num_special_tokens", 1000),
        special_tokens=_special_tokens(args),
    )


def _build_null(args, kind: str) -> MegatronTokenizer:
    from megatron.training.tokenizer.null_tokenizer import NullTokenizer

    return NullTokenizer(
        getattr(args, "vocab_size", None),
        eod_id=getattr(args, "null_tokenizer_eod_id", None),
        pad_id=getattr(args, "null_tokenizer_pad_id", -1),
    )


_BUILDERS = {
    "BertWordPieceLowerCase": _build_bert,
    "BertWordPieceCase": _build_bert,
    "GPT2BPETokenizer": _build_gpt2,
    "SentencePieceTokenizer": _build_sentencepiece,
    "GPTSentencePieceTokenizer": _build_sentencepiece,
    "Llama2Tokenizer": _build_sentencepiece,
    "HuggingFaceTokenizer": _build_huggingface,
    "TikTokenizer": _build_tiktoken,
    "NullTokenizer": _build_null,
    "SFTTokenizer": _build_sft,
}


def build_tokenizer(args) -> MegatronTokenizer:
    """Return the tokenizer for ``args.tokenizer_type`` (reads only tokenizer flags)."""
    kind = getattr(args, "tokenizer_type", None)
    if kind is None and getattr(args, "vocab_file", None) and getattr(args, "merge_file", None):
        # Megatron's GPT-3 example scripts give a BPE vocab and merges file and no type; those
        # two files together only ever describe GPT-2's byte-level BPE.
        kind = "GPT2BPETokenizer"
        logger.info("--tokenizer-type not given: --vocab-file with --merge-file means GPT2BPETokenizer")
    if kind in UNSUPPORTED_TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {kind} is not supported by this framework; use one of {', '.join(TEXT_TOKENIZER_TYPES)}"
        )
    if kind not in _BUILDERS:
        raise ValueError(
            f"--tokenizer-type {kind!r} is unknown; choose one of {', '.join(TEXT_TOKENIZER_TYPES)} "
            "(NullTokenizer with --vocab-size for mock data)"
        )
    if getattr(args, "tokenizer_metadata", None):
        logger.warning("--tokenizer-metadata is ignored: the tokenizer is chosen by --tokenizer-type %s", kind)
    tokenizer = _BUILDERS[kind](args, kind)
    logger.info("tokenizer: %s, vocab size %d", kind, tokenizer.vocab_size)
    return tokenizer
