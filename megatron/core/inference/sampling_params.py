"""How one request's tokens are chosen and when its generation stops."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (Megatron-Core's field names).

    ``top_k`` 1 or ``temperature`` 0 is greedy (argmax). Otherwise the logits are divided by
    ``temperature``, cut to the ``top_k`` largest (0: no cut) and to the smallest set whose
    probability reaches ``top_p`` (0 or 1: no cut), then one token is drawn. A
    ``random_seed`` makes the draw reproducible: the request gets its own generator, so
    its tokens do not depend on the other requests of the batch.
    ``num_tokens_to_generate`` 0 scores the prompt only (log-probs, no new token).
    Generation stops after a token of ``stop_token_ids`` (kept in the output) or once the
    generated text contains one of ``stop_strings``. ``top_logprobs`` (with
    ``return_log_probs``) also returns, for every scored position, that many most likely
    tokens and their log-probs (OpenAI's ``logprobs`` / ``top_logprobs``; at most 20).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    return_log_probs: bool = False
    num_tokens_to_generate: int = 30
    random_seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()
    top_logprobs: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.num_tokens_to_generate < 0:
            raise ValueError(f"num_tokens_to_generate must be >= 0, got {self.num_tokens_to_generate}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.return_log_probs:
            raise ValueError("top_logprobs needs return_log_probs=True")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(s for s in self.stop_strings if s)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0
