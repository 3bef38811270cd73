"""Validation, data and tokenizer flags."""

from __future__ import annotations

import argparse

TOKENIZER_TYPES = [
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
]


def add_validation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """In-training evaluation."""
    g = parser.add_argument_group(title="validation")
    g.add_argument("--eval-iters", type=int, default=100, help="Batches averaged per evaluation.")
    g.add_argument("--eval-micro-batch-size", type=int, default=None,
                   help="Micro-batch size of validation and test passes (default: --micro-batch-size).")
    g.add_argument("--eval-global-batch-size", type=int, default=None,
                   help="Samples per evaluation batch (default: --global-batch-size).")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="Evaluate on the validation set every this many iterations; "
                        "no periodic evaluation when not given (Megatron HEAD default).")
    g.add_argument("--start-eval-at-iter", type=int, default=None,
                   help="Periodic evaluation (--eval-interval) only at iterations >= this one.")
    g.add_argument("--skip-train", action="store_true",
                   help="Skip training; only evaluate on the validation/test sets and exit.")
    g.add_argument("--full-validation", action="store_true",
                   help="Each evaluation reads the whole validation set (one epoch) instead of --eval-iters batches.")
    g.add_argument("--multiple-validation-sets", action="store_true",
                   help="Evaluate each prefix of --valid-data-path separately, logged as 'validation-<index>' "
                        "(needs --full-validation).")
    g.add_argument("--validation-set-names", nargs="+", type=str, default=None,
                   help="Names of the validation sets of --multiple-validation-sets, used instead of their "
                        "index in the log and TensorBoard ('validation-<name>').")
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Dataset paths, blending, splits, sequence lengths and loader options."""
    g = parser.add_argument_group(title="data and dataloader")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Dataset prefix, or 'w1 prefix1 w2 prefix2 ...' for a weighted blend.")
    g.add_argument("--split", type=str, default=None,
                   help="Train/valid/test proportions, e.g. 969,30,1 (the default with --data-path).")
    g.add_argument("--train-data-path", nargs="*", default=None, help="Blend for the train split only.")
    g.add_argument("--valid-data-path", nargs="*", default=None, help="Blend for the validation split only.")
    g.add_argument("--test-data-path", nargs="*", default=None, help="Blend for the test split only.")
    g.add_argument("--data-args-path", type=str, default=None, help="File holding the --data-path tokens.")
    g.add_argument("--per-split-data-args-path", type=str, default=None,
                   help="JSON file with 'train', 'valid' and 'test' blends.")
    g.add_argument("--data-cache-path", type=str, default=None, help="Directory for the dataset index caches.")
    g.add_argument("--mock-data", action="store_true", help="Use synthetic data instead of --data-path.")
    g.add_argument("--seq-length", type=int, default=None, help="Tokens per training sample.")
    g.add_argument("--encoder-seq-length", type=int, default=None,
                   help="Encoder sequence length (alias of --seq-length).")
    g.add_argument("--decoder-seq-length", type=int, default=None, help="Decoder sequence length (T5).")
    g.add_argument("--mask-prob", type=float, default=0.15, help="Masking probability (BERT/T5).")
    g.add_argument("--short-seq-prob", type=float, default=0.1, help="Probability of a short sequence (BERT).")
    g.add_argument("--num-workers", type=int, default=2, help="Data loader worker processes.")
    g.add_argument("--reset-position-ids", action="store_true", help="Restart position ids after each end-of-document.")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="Do not attend across end-of-document tokens.")
    g.add_argument("--eod-mask-loss", action="store_true", help="Do not train on end-of-document tokens.")
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader",
                   help="Do not build the causal attention mask in the data loader.")
    g.add_argument("--num-dataset-builder-threads", type=int, default=1, help="Threads building dataset indices.")
    g.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files",
                   help="Read .bin files with file reads instead of mmap.")
    g.add_argument("--allow-ambiguous-pad-tokens", action="store_true",
                   help="Keep masking pad tokens even when the pad id equals another special id.")
    g.add_argument("--mid-level-dataset-surplus", type=float, default=0.005,
                   help="Extra samples requested from each blended dataset.")
    g.add_argument("--sft", action="store_true",
                   help="Supervised fine-tuning: --data-path names .jsonl files of conversations, packed one line "
                        "per sample with the loss on assistant tokens (needs --tokenizer-type SFTTokenizer).")
    return parser


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Tokenizer selection and files."""
    g = parser.add_argument_group(title="tokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size (NullTokenizer, TikTokenizer).")
    g.add_argument("--vocab-file", type=str, default=None, help="Vocabulary file.")
    g.add_argument("--merge-file", type=str, default=None, help="BPE merges file.")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="Extra sentinel tokens <extra_id_i> (T5).")
    g.add_argument("--tokenizer-type", type=str, default=None, choices=TOKENIZER_TYPES, help="Tokenizer.")
    g.add_argument("--tokenizer-model", type=str, default=None,
                   help="Tokenizer model file, Hugging Face name or directory.")
    g.add_argument("--tokenizer-metadata", type=str, default=None, help="JSON overriding how the tokenizer is built.")
    g.add_argument("--tiktoken-pattern", type=str, default=None, choices=["v1", "v2"], help="TikToken split pattern.")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000, help="Special ids of TikTokenizer.")
    g.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens", nargs="+", type=str, default=None,
                   dest="tokenizer_special_tokens", help="Special tokens added to the tokenizer.")
    g.add_argument("--trust-remote-code", action="store_true", help="Allow Hugging Face remote code.")
    g.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                   help="End-of-document id of NullTokenizer; default vocab size - 1.")
    g.add_argument("--null-tokenizer-pad-id", type=int, default=-1, help="Pad id of NullTokenizer.")
    g.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                   help="SentencePiece tokenizers add special tokens (--tokenizer-special-tokens, "
                        "--vocab-extra-ids) as Megatron's legacy tokenizers did.")
    g.add_argument("--tokenizer-hf-no-use-fast", action="store_false", dest="tokenizer_hf_use_fast",
                   help="Load the Hugging Face tokenizer's slow (Python) implementation.")
    g.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_false",
                   dest="tokenizer_hf_include_special_tokens",
                   help="Do not add special tokens when encoding with a Hugging Face tokenizer.")
    g.add_argument("--sft-tokenizer-prompt-format", type=str, default="nemotron-h-aligned",
                   help="How SFTTokenizer writes a conversation: nemotron-h-aligned, nemotron-nano-v2, or default "
                        "(the tokenizer's own chat template).")
    g.add_argument("--chat-template", type=str, default=None,
                   help="A jinja chat template replacing the tokenizer's own for the SFT prompt format 'default'.")
    g.add_argument("--no-pad-vocab-size", "--disable-pad-vocab-size", action="store_false", dest="pad_vocab_size",
                   help="Use the tokenizer's vocabulary size as is, without padding.")
    return parser
