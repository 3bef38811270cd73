"""Fill-in-the-middle (FIM) GPT samples (--fim-data), on top of the GPT dataset.

Each sample's ``S + 1`` tokens are cut at the end-of-document token (--fim-eod-token) into
segments; every non-empty segment becomes, with probability --fim-rate, a FIM example:

- its text (detokenized) is cut at two uniformly drawn character positions into
  prefix / middle / suffix, each re-tokenized on its own;
- with probability --fim-spm-rate it is written SPM,
  ``<prefix_tok> <suffix_tok> suffix <middle_tok> prefix middle``, otherwise PSM,
  ``<prefix_tok> prefix <suffix_tok> suffix <middle_tok> middle``;
- a segment whose text starts with --fim-no-prefix is left as it is.

With --fim-split-sample, a segment holding that token is instead (with probability
--fim-rate) cut again at it and each fragment is transformed with probability
--fim-fragment-rate. The transformed sample is cut back, or padded with --fim-pad-token, to
its original length. Draws come from ``numpy.random.RandomState``, in this order per
segment: the FIM coin, the two cut points, the SPM coin.

One difference from Megatron-LM, on purpose: Megatron draws from a single generator per
dataset object, so a sample's form depends on which samples were read before it (data
loader workers, resumed runs). Here each sample has its own generator, seeded with
``(--seed, sample index)``, so sample i is the same however and whenever it is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

logger = logging.getLogger(__name__)

# Keys of GPTFIMDatasetConfig.fim_extra_tokens and the flag that names each token.
FIM_TOKEN_FLAGS = {
    "prefix": "--fim-prefix-token",
    "middle": "--fim-middle-token",
    "suffix": "--fim-suffix-token",
    "pad": "--fim-pad-token",
    "eod": "--fim-eod-token",
}


def _rate(flag: str, value: Optional[float]) -> None:
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag} must be a probability in [0, 1], got {value!r}")


@dataclass
class GPTFIMDatasetConfig(GPTDatasetConfig):
    """Configuration of fill-in-the-middle GPT datasets (names follow Megatron-LM's)."""

    fim_rate: float = 0.5
    """Probability that a segment becomes a FIM example (--fim-rate)."""

    fim_spm_rate: float = 0.5
    """Probability that a FIM example is written SPM rather than PSM (--fim-spm-rate)."""

    fim_extra_tokens: Optional[Dict[str, str]] = None
    """The FIM token strings, keys prefix, middle, suffix, pad and eod (--fim-*-token)."""

    fim_split_sample: Optional[str] = None
    """Token at which a segment is cut into fragments transformed one by one (--fim-split-sample)."""

    fim_fragment_rate: Optional[float] = None
    """Probability that each fragment becomes a FIM example (--fim-fragment-rate)."""

    fim_no_prefix: Optional[str] = None
    """Segments whose text starts with this string are never transformed (--fim-no-prefix)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _rate("--fim-rate", self.fim_rate)
        _rate("--fim-spm-rate", self.fim_spm_rate)
        if self.fim_split_sample is not None:
            _rate("--fim-fragment-rate (needed with --fim-split-sample)", self.fim_fragment_rate)
        missing = sorted(set(FIM_TOKEN_FLAGS) - set(self.fim_extra_tokens or {}))
        if missing:
            raise ValueError(
                f"GPTFIMDatasetConfig.fim_extra_tokens lacks {missing}; give all of {list(FIM_TOKEN_FLAGS)}"
            )


def fim_token_id(tokenizer, token: str, flag: str) -> int:
    """The id of the single token ``token``; ValueError naming ``flag`` when the tokenizer
    has no such token."""
    vocab = getattr(tokenizer, "vocab", None) or {}
    if token in vocab:
        return int(vocab[token])
    raise ValueError(
        f"{flag} {token!r}: the tokenizer ({type(tokenizer).__name__}) has no such token. FIM needs its "
        "special tokens in the vocabulary: use a tokenizer that has them, add them with "
        "--tokenizer-special-tokens, or name the tokenizer's own tokens with --fim-prefix-token, "
        "--fim-middle-token, --fim-suffix-token, --fim-pad-token and --fim-eod-token"
    )


class FIMTransform:
    """The FIM rewrite of one sample's token ids (the module docstring states it)."""

    def __init__(self, config: GPTFIMDatasetConfig) -> None:
        tokenizer = config.tokenizer
        ids = {key: fim_token_id(tokenizer, config.fim_extra_tokens[key], flag)
               for key, flag in FIM_TOKEN_FLAGS.items()}
        self.prefix_id, self.middle_id, self.suffix_id = ids["prefix"], ids["middle"], ids["suffix"]
        self.pad_id, self.eod_id = ids["pad"], ids["eod"]
        self.split_id = None
        if config.fim_split_sample is not None:
            self.split_id = fim_token_id(tokenizer, config.fim_split_sample, "--fim-split-sample")
        self.tokenizer = tokenizer
        self.rate, self.spm_rate = config.fim_rate, config.fim_spm_rate
        self.fragment_rate, self.no_prefix = config.fim_fragment_rate, config.fim_no_prefix

    def __call__(self, sample: numpy.ndarray, rng: numpy.random.RandomState) -> numpy.ndarray:
        """``sample`` rewritten segment by segment, cut or padded to its own length."""
        pieces = _split_keeping_separators(sample, self.eod_id)
        out = [self._segment(piece, rng) if sep is None else piece for piece, sep in pieces]
        new = numpy.concatenate(out) if out else sample[:0]
        if len(new) >= len(sample):
            return new[: len(sample)].astype(numpy.int64)
        return numpy.concatenate([new, numpy.full(len(sample) - len(new), self.pad_id)]).astype(numpy.int64)

    def _segment(self, segment: numpy.ndarray, rng) -> numpy.ndarray:
        if self.split_id is None or not (segment == self.split_id).any():
            return self._permute(segment, self.rate, rng)
        if not rng.binomial(1, self.rate):
            return segment
        pieces = _split_keeping_separators(segment, self.split_id)
        return numpy.concatenate(
            [self._permute(piece, self.fragment_rate, rng) if sep is None else piece for piece, sep in pieces]
        )

    def _permute(self, ids: numpy.ndarray, rate: float, rng) -> numpy.ndarray:
        if not rng.binomial(1, rate):
            return ids
        text = self.tokenizer.detokenize([int(i) for i in ids])
        if self.no_prefix is not None and text.startswith(self.no_prefix):
            return ids
        # Cut points may coincide or sit at either end: any part may be empty.
        lo, hi = sorted(int(b) for b in rng.randint(low=0, high=len(text) + 1, size=2))
        prefix, middle, suffix = (numpy.asarray(self.tokenizer.tokenize(part), dtype=numpy.int64)
                                  for part in (text[:lo], text[lo:hi], text[hi:]))
        if rng.binomial(1, self.spm_rate):
            parts = [[self.prefix_id, self.suffix_id], suffix, [self.middle_id], prefix, middle]
        else:
            parts = [[self.prefix_id], prefix, [self.suffix_id], suffix, [self.middle_id], middle]
        return numpy.concatenate([numpy.asarray(p, dtype=numpy.int64) for p in parts])


def _split_keeping_separators(ids: numpy.ndarray, separator: int) -> List[tuple]:
    """``ids`` as a list of (piece, None) for the non-empty runs between separators and
    (separator array, separator) for each separator, in order."""
    out: List[tuple] = []
    start = 0
    for pos in numpy.flatnonzero(ids == separator):
        if pos > start:
            out.append((ids[start:pos], None))
        out.append((ids[pos:pos + 1], separator))
        start = pos + 1
    if start < len(ids):
        out.append((ids[start:], None))
    return out


class GPTFIMDataset(GPTDataset):
    """A ``GPTDataset`` whose samples are rewritten by ``FIMTransform`` (--fim-data)."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config: GPTFIMDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.fim = FIMTransform(config)
        logger.info("FIM %s samples: rate %.3f, SPM rate %.3f, generators seeded with (%d, sample index)",
                    index_split.name, config.fim_rate, config.fim_spm_rate, config.random_seed)

    def _query_document_sample_shuffle_indices(self, idx: int) -> numpy.ndarray:
        text = super()._query_document_sample_shuffle_indices(idx)
        # The GPT dataset pads a short final validation sample with its pad id (-1 when the
        # tokenizer has none); only the real tokens are rewritten.
        real = text[text != self._pad_token_id] if self._pad_token_id < 0 else text
        rng = numpy.random.RandomState([self.config.random_seed % 2**32, idx])
        fim = self.fim(real, rng)
        if len(fim) == len(text):
            return fim
        return numpy.concatenate([fim, text[len(fim):]])


def fim_config_kwargs(args) -> dict:
    """The ``GPTFIMDatasetConfig`` fields the --fim-* flags set."""
    if args.mock_data:
        raise ValueError("--fim-data rewrites text read from --data-path; it cannot be combined with --mock-data")
    return dict(
        fim_rate=args.fim_rate,
        fim_spm_rate=args.fim_spm_rate,
        fim_extra_tokens={"prefix": args.fim_prefix_token, "middle": args.fim_middle_token,
                          "suffix": args.fim_suffix_token, "pad": args.fim_pad_token, "eod": args.fim_eod_token},
        fim_split_sample=args.fim_split_sample,
        fim_fragment_rate=args.fim_fragment_rate,
        fim_no_prefix=args.fim_no_prefix,
    )
