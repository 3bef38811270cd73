"""One generation request (prompt token ids + settings) and its result."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megatron.core.inference.sampling_params import SamplingParams


@dataclasses.dataclass
class InferenceRequest:
    """A prompt as token ids (at least one) and how to continue it."""

    prompt_tokens: List[int]
    sampling_params: SamplingParams = dataclasses.field(default_factory=SamplingParams)

    def __post_init__(self):
        if len(self.prompt_tokens) == 0:
            raise ValueError("a prompt needs at least one token (add a BOS token to an empty prompt)")


@dataclasses.dataclass
class GenerationResult:
    """What generation produced for one request.

    ``prompt_log_probs[i]`` is log p(prompt[i + 1] | prompt[:i + 1]) (len(prompt) - 1
    values); ``generated_log_probs[i]`` that of ``generated_tokens[i]``. Both are the
    model's own distribution (log-softmax of the logits, before temperature or top-k/p)
    and None unless ``return_log_probs``. ``finish_reason``: "length" (the token budget is
    used up), "stop" (a stop token, kept as the last generated token, or a stop string,
    named in ``stop_string``), "cancelled" (the caller gave up on it).
    ``prompt_top_log_probs`` / ``generated_top_log_probs`` (with ``top_logprobs`` > 0): for
    the same positions, the ``top_logprobs`` most likely (token, log-prob), best first.
    """

    prompt_tokens: List[int]
    generated_tokens: List[int]
    prompt_log_probs: Optional[List[float]] = None
    generated_log_probs: Optional[List[float]] = None
    finish_reason: str = "length"
    stop_string: Optional[str] = None
    prompt_top_log_probs: Optional[List[List[Tuple[int, float]]]] = None
    generated_top_log_probs: Optional[List[List[Tuple[int, float]]]] = None
