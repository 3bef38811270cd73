"""Encoder models (BERT): scoring, fill-mask and embeddings, one bidirectional forward per
batch.

A BERT model does not generate text; what a client asks of it is:

- the log-probability the MLM head gives each token of a sequence (one forward);
- the top-k candidates at each ``[MASK]`` position (fill-mask);
- the pseudo-log-likelihood of a sequence (Salazar et al., 2020, "Masked Language Model
  Scoring"): each token's log-probability with that token alone replaced by ``[MASK]``,
  one forward per scored position, batched;
- the binary head's log-probabilities (next-sentence / sentence-order) where it has one;
- a sentence embedding (``embed``): the last hidden states mean-pooled over the real
  tokens (sentence-transformers' mean pooling), the ``[CLS]`` state, or the pooler's output,
  optionally L2-normalized. This needs no LM head: headless ``BertModel`` checkpoints
  (sentence-embedding models) serve it.

Sequences of different lengths run together right-padded, with the padding mask; a padded
batch gives each sequence what it gives alone (up to the rounding of batched matmuls).
Every rank of the model-parallel group calls ``score`` with the same requests; the last
pipeline stage computes the values and ``ModelStep.share_from_last_stage`` hands them to
every rank, so results are complete everywhere (rank 0 answers the client).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron.core.inference.model_step import ModelStep


@dataclasses.dataclass
class MaskedLMRequest:
    """A whole input sequence as the model sees it (``[CLS] ... [SEP]`` included).

    ``token_types``: segment ids (0/1), zeros when None. ``top_k``: candidates to return
    at each position holding the mask token. ``pseudo_log_likelihood``: also score each
    position with only that token masked (one extra forward per position not in the
    engine's ``special_ids``)."""

    tokens: List[int]
    token_types: Optional[List[int]] = None
    top_k: int = 0
    pseudo_log_likelihood: bool = False

    def __post_init__(self):
        if len(self.tokens) == 0:
            raise ValueError("a masked-LM request needs at least one token")
        if self.token_types is not None and len(self.token_types) != len(self.tokens):
            raise ValueError(f"token_types has {len(self.token_types)} entries for {len(self.tokens)} tokens")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class MaskedLMResult:
    """``log_probs[i]``: log p(tokens[i]) from the MLM head over the whole sequence as given.
    ``mask_predictions``: position of each mask token -> its ``top_k`` (token id, log-prob),
    most likely first. ``sentence_log_probs``: the binary head's log-softmax (index 0: the
    second segment follows the first / is in order; 1: random / swapped), None without it.
    ``pseudo_log_probs[i]``: log p(tokens[i]) with tokens[i] masked, None at special
    positions, and the whole list None unless asked. Log-probs range over the tokenizer's
    vocabulary (the model's padding rows excluded)."""

    tokens: List[int]
    log_probs: List[float]
    mask_predictions: Dict[int, List[Tuple[int, float]]]
    sentence_log_probs: Optional[List[float]] = None
    pseudo_log_probs: Optional[List[Optional[float]]] = None

    @property
    def pseudo_log_likelihood(self) -> Optional[float]:
        """The sum of ``pseudo_log_probs`` over the scored positions (None unless asked)."""
        if self.pseudo_log_probs is None:
            return None
        return float(sum(v for v in self.pseudo_log_probs if v is not None))


POOLINGS = ("mean", "cls", "pooler")


class EncoderStep(ModelStep):
    """forward(tokens [b, s], token_types [b, s], attention_mask [b, s]) -> (MLM logits
    [b, s, V] fp32, binary-head logits [b, 2] fp32 or None) on the last pipeline stage,
    None elsewhere; with ``hidden_states=True`` the last hidden states [b, s, h] instead.
    The model is a ``BertModel`` (its forward signature)."""

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, token_types: Optional[torch.Tensor], attention_mask: torch.Tensor,
                 hidden_states: bool = False):
        output = self.run_stage(
            tokens, lambda: self.model(tokens, attention_mask, token_types, return_embeddings=hidden_states))
        if output is None or hidden_states:
            return output
        lm_logits, binary_logits = output
        if lm_logits is None:
            raise ValueError("masked-LM scoring needs the LM head: build the BertModel with add_lm_head=True")
        return self.full_vocabulary(lm_logits).float(), None if binary_logits is None else binary_logits.float()


@dataclasses.dataclass
class _Row:
    """One sequence of a forward: a request's own tokens, or a copy with one position masked."""

    request: int
    tokens: List[int]
    types: List[int]
    masked_position: Optional[int] = None  # a pseudo-log-likelihood row


class EncoderEngine:
    """score(requests) -> one MaskedLMResult per request, in order; embed(requests) -> one
    vector per request. Both run the model in eval mode (no dropout) and put back the mode
    it was in.

    ``max_batch_size`` sequences run in one forward (pseudo-log-likelihood copies count
    as sequences); ``max_sequence_length`` bounds a request (BERT's learned positions end at
    --max-position-embeddings). ``mask_id`` is the tokenizer's ``[MASK]``; ``pad_id`` fills
    padded positions (the padding mask hides them); ``special_ids`` (``[CLS]``, ``[SEP]``,
    ``[PAD]``) are not scored by the pseudo-log-likelihood; ``vocab_size`` is the
    tokenizer's."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int, mask_id: int,
                 pad_id: int = 0, vocab_size: Optional[int] = None, special_ids: Sequence[int] = ()):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError("max_batch_size and max_sequence_length must be >= 1")
        self.model = model
        self.step = EncoderStep(model)
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.special_ids = frozenset(special_ids)
        self.device = next(model.parameters()).device
        embedding = getattr(model, "embedding", None)
        # Known on the first stage, which is the one that reads requests from clients.
        self.has_token_types = embedding is not None and getattr(embedding, "num_tokentypes", 0) > 0
        self.has_binary_head = bool(getattr(model, "add_binary_head", False))
        self.has_lm_head = bool(getattr(model, "add_lm_head", True))
        self.has_pooler = bool(getattr(model, "add_pooler", False))
        self.hidden_size = model.config.hidden_size

    @staticmethod
    def _own_row(index: int, request: MaskedLMRequest) -> _Row:
        types = list(request.token_types) if request.token_types is not None else [0] * len(request.tokens)
        return _Row(index, list(request.tokens), types)

    def rows(self, requests: Sequence[MaskedLMRequest]) -> List[_Row]:
        """The sequences scoring ``requests`` takes: each request's own, then its masked copies."""
        out: List[_Row] = []
        for index, request in enumerate(requests):
            own = self._own_row(index, request)
            out.append(own)
            if request.pseudo_log_likelihood:
                for position, token in enumerate(request.tokens):
                    if token not in self.special_ids:
                        masked = list(request.tokens)
                        masked[position] = self.mask_id
                        out.append(_Row(index, masked, own.types, position))
        return out

    def _check(self, requests: Sequence[MaskedLMRequest]) -> None:
        if not requests:
            raise ValueError("the encoder engine needs at least one request")
        for i, request in enumerate(requests):
            if len(request.tokens) > self.max_sequence_length:
                raise ValueError(f"request {i} has {len(request.tokens)} tokens, more than the maximum sequence "
                                 f"length {self.max_sequence_length}")

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def score(self, requests: Sequence[MaskedLMRequest]) -> List[MaskedLMResult]:
        if not self.has_lm_head:
            raise ValueError("this BERT model has no LM head (a headless BertModel): it embeds but does not score")
        self._check(requests)
        results = [MaskedLMResult(list(r.tokens), [0.0] * len(r.tokens), {},
                                  pseudo_log_probs=[None] * len(r.tokens) if r.pseudo_log_likelihood else None)
                   for r in requests]
        rows = self.rows(requests)
        with self._eval_mode():
            for start in range(0, len(rows), self.max_batch_size):
                self._run_batch(rows[start:start + self.max_batch_size], requests, results)
        return results

    def _padded(self, sequences: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
        out = torch.full((len(sequences), max(len(x) for x in sequences)), fill, dtype=torch.long)
        for b, values in enumerate(sequences):
            out[b, :len(values)] = torch.tensor(values, dtype=torch.long)
        return out.to(self.device)

    def _inputs(self, rows: List[_Row]):
        """tokens, token types (None for a model without them) and the padding mask."""
        tokens = self._padded([row.tokens for row in rows], self.pad_id)
        types = self._padded([row.types for row in rows], 0)
        attention = self._padded([[1] * len(row.tokens) for row in rows], 0)
        return tokens, types if self.has_token_types else None, attention

    def _run_batch(self, rows: List[_Row], requests: Sequence[MaskedLMRequest], results: List[MaskedLMResult]) -> None:
        tokens, types, attention = self._inputs(rows)
        batch, seq = tokens.shape
        # The request's own tokens are what is scored (a pseudo-log-likelihood row masks one).
        targets = self._padded([requests[row.request].tokens for row in rows], self.pad_id)
        top_k = max([requests[row.request].top_k for row in rows if row.masked_position is None] + [0])
        # What the last stage computes, shared with every rank in place.
        token_log_probs = torch.zeros((batch, seq), dtype=torch.float32, device=self.device)
        sentence = torch.zeros((batch, 2), dtype=torch.float32, device=self.device)
        top_values = torch.zeros((batch, seq, top_k), dtype=torch.float32, device=self.device)
        top_ids = torch.zeros((batch, seq, top_k), dtype=torch.long, device=self.device)
        output = self.step(tokens, types, attention)
        if output is not None:
            lm_logits, binary_logits = output
            if self.vocab_size is not None:
                lm_logits = lm_logits[..., :self.vocab_size]
            normalizer = torch.logsumexp(lm_logits, dim=-1)
            token_log_probs.copy_(lm_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normalizer)
            if top_k:
                values, ids = lm_logits.topk(min(top_k, lm_logits.shape[-1]), dim=-1)
                top_values[..., :values.shape[-1]] = values - normalizer.unsqueeze(-1)
                top_ids[..., :ids.shape[-1]] = ids
            if binary_logits is not None:
                sentence.copy_(torch.log_softmax(binary_logits, dim=-1))
        for shared in (token_log_probs, sentence, top_values, top_ids):
            self.step.share_from_last_stage(shared)
        self._collect(rows, requests, results, token_log_probs.cpu(), sentence.cpu(), top_values.cpu(), top_ids.cpu())

    def _collect(self, rows, requests, results, token_log_probs, sentence, top_values, top_ids) -> None:
        for b, row in enumerate(rows):
            result, request = results[row.request], requests[row.request]
            if row.masked_position is not None:
                result.pseudo_log_probs[row.masked_position] = float(token_log_probs[b, row.masked_position])
                continue
            result.log_probs = token_log_probs[b, :len(row.tokens)].tolist()
            if self.has_binary_head:
                result.sentence_log_probs = sentence[b].tolist()
            if request.top_k:
                k = min(request.top_k, self.vocab_size or request.top_k)
                for position, token in enumerate(row.tokens):
                    if token == self.mask_id:
                        result.mask_predictions[position] = list(zip(top_ids[b, position, :k].tolist(),
                                                                     top_values[b, position, :k].tolist()))

    def embed(self, requests: Sequence[MaskedLMRequest], pooling: str = "mean", normalize: bool = True
              ) -> List[List[float]]:
        """One vector [hidden size] per request: ``pooling`` "mean" (the last hidden states
        averaged over the request's tokens), "cls" (the first token's state) or "pooler"
        (the pooler's dense + tanh over it); L2-normalized with ``normalize``."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and not self.has_pooler:
            raise ValueError("pooling 'pooler' needs a BertModel with a pooler; use 'mean' or 'cls'")
        self._check(requests)
        rows = [self._own_row(i, r) for i, r in enumerate(requests)]
        vectors: List[List[float]] = []
        with self._eval_mode():
            for start in range(0, len(rows), self.max_batch_size):
                vectors.extend(self._embed_batch(rows[start:start + self.max_batch_size], pooling, normalize))
        return vectors

    @torch.no_grad()
    def _embed_batch(self, rows: List[_Row], pooling: str, normalize: bool) -> List[List[float]]:
        tokens, types, attention = self._inputs(rows)
        pooled = torch.zeros((len(rows), self.hidden_size), dtype=torch.float32, device=self.device)
        hidden = self.step(tokens, types, attention, hidden_states=True)
        if hidden is not None:
            pooled.copy_(self._pool(hidden, attention, pooling).float())
            if normalize:
                pooled.copy_(F.normalize(pooled, p=2, dim=-1))
        return self.step.share_from_last_stage(pooled).cpu().tolist()

    def _pool(self, hidden: torch.Tensor, attention: torch.Tensor, pooling: str) -> torch.Tensor:
        if pooling == "mean":
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if pooling == "cls":
            return hidden[:, 0]
        return self.model.pooler(hidden.transpose(0, 1), 0)
