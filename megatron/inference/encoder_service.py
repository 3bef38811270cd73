"""The serving side of an encoder (BERT): tokenizer, engine, limits and the lock in front.

Text becomes a BERT input as the tokenizer's own pair encoding frames it: ``[CLS] text
[SEP]``; a ``[SEP]`` written inside the text splits it into two segments (token type 0 up to
and including the first ``[SEP]``, 1 after it), so ``"first part [SEP] second part"`` is a
sentence pair for the binary (next-sentence / sentence-order) head. One batch runs at a time;
concurrent clients queue on the lock, as in ``TextGenerationService``.
"""

from __future__ import annotations

import threading
from typing import List, Sequence, Tuple

from megatron.core.inference.engines.encoder_engine import EncoderEngine, MaskedLMRequest, MaskedLMResult
from megatron.inference.errors import RequestError
from megatron.inference.text_service import ServingLimits


def special_token_ids(tokenizer) -> Tuple[int, int, int, int]:
    """(cls, sep, mask, pad) of a BERT tokenizer; ValueError naming what is missing."""
    ids = {name: getattr(tokenizer, name, None) for name in ("cls", "sep", "mask", "pad")}
    missing = [f"[{name.upper()}]" for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"serving a BERT model needs a tokenizer with [CLS], [SEP], [MASK] and [PAD]; this one lacks "
                         f"{', '.join(missing)}: use --tokenizer-type BertWordPieceLowerCase / BertWordPieceCase, or "
                         "a HuggingFaceTokenizer of a BERT model")
    return ids["cls"], ids["sep"], ids["mask"], ids["pad"]


class EncoderService:
    """Text in, scores or embeddings out, over one EncoderEngine. ``leader``
    (rank_roles.Leader) is set when other ranks must run every batch too. ``pooling`` and
    ``normalize`` shape the embeddings (``EncoderEngine.embed``)."""

    def __init__(self, engine: EncoderEngine, tokenizer, limits: ServingLimits, model_name: str = "megatron",
                 leader=None, pooling: str = "mean", normalize: bool = True):
        self.engine = engine
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_name = model_name
        self.leader = leader
        self.cls, self.sep, self.mask, self.pad = special_token_ids(tokenizer)
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.active_requests = 0
        self.cancelled_requests = 0  # scoring is never cancelled; /health reports it as the generation server does

    # --- text <-> tokens ---------------------------------------------------------------
    def encode(self, text: str) -> Tuple[List[int], List[int]]:
        """(tokens, token types) of ``text`` framed as ``[CLS] ... [SEP]``."""
        return self.frame(self.tokenizer.tokenize(text))

    def frame(self, ids: Sequence[int]) -> Tuple[List[int], List[int]]:
        """(tokens, token types) of token ids given by a client: ``[CLS]`` and ``[SEP]``
        added where they are not already first and last."""
        tokens = list(ids)
        if not tokens or tokens[0] != self.cls:
            tokens = [self.cls] + tokens
        if tokens[-1] != self.sep:
            tokens.append(self.sep)
        first_sep = tokens.index(self.sep)
        return tokens, [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(ids))

    def without_specials(self, ids: Sequence[int]) -> List[int]:
        return [t for t in ids if t not in (self.cls, self.sep, self.pad)]

    # --- limits ---------------------------------------------------------------------------
    def check(self, requests: List[MaskedLMRequest], field: str) -> None:
        """RequestError naming ``field`` when the requests cannot run within the limits."""
        if len(requests) > self.limits.max_prompts:
            raise RequestError(f"{field}: {len(requests)} inputs exceed the maximum of {self.limits.max_prompts} per "
                               "request", field=field)
        max_len = min(self.limits.max_sequence_length, self.engine.max_sequence_length)
        for i, request in enumerate(requests):
            if len(request.tokens) > max_len:
                raise RequestError(f"{field}[{i}] has {len(request.tokens)} tokens with [CLS] and [SEP], more than "
                                   f"the model's {max_len} positions", field=field)
        rows = self.engine.rows(requests)
        batch = self.engine.max_batch_size
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            longest = max(len(row.tokens) for row in chunk)
            if longest * len(chunk) > self.limits.max_tokens_to_oom:
                raise RequestError(f"{len(chunk)} sequences x {longest} tokens exceed --max-tokens-to-oom "
                                   f"{self.limits.max_tokens_to_oom}: send fewer or shorter inputs (each "
                                   "pseudo-log-likelihood position is one more sequence)", field=field)

    # --- running ---------------------------------------------------------------------------
    def score(self, requests: List[MaskedLMRequest]) -> List[MaskedLMResult]:
        """Score ``requests`` once the engine is free."""
        return self._run("score", requests)

    def embed(self, requests: List[MaskedLMRequest]) -> List[List[float]]:
        """One embedding per request once the engine is free."""
        return self._run("embed", requests, pooling=self.pooling, normalize=self.normalize)

    def _run(self, method: str, requests, **options):
        with self._counter_lock:
            self.active_requests += 1
        try:
            with self._lock:
                if self.leader is not None:
                    self.leader.announce(requests, method, **options)
                return getattr(self.engine, method)(requests, **options)
        finally:
            with self._counter_lock:
                self.active_requests -= 1
