"""The progress of one request inside an engine."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron.core.inference.inference_request import GenerationResult, InferenceRequest
from megatron.core.inference.sampling import make_generator


class RequestState:
    """The progress of one request: its tokens, log-probs and whether it is done."""

    def __init__(self, request: InferenceRequest, device: torch.device):
        self.request = request
        self.params = request.sampling_params
        self.prompt_len = len(request.prompt_tokens)
        self.total_len = self.prompt_len + self.params.num_tokens_to_generate
        self.generator = make_generator(self.params, device)
        self.generated: List[int] = []
        self.log_probs: List[float] = []  # of positions 1, 2, ... in order
        self.top_log_probs: List[List[Tuple[int, float]]] = []  # the same positions' alternatives
        self.done = self.params.num_tokens_to_generate == 0 and self.prompt_len <= 1
        self.finish_reason = "length"
        self.stop_string: Optional[str] = None

    def result(self) -> GenerationResult:
        prompt_lps = gen_lps = None
        if self.params.return_log_probs:
            prompt_lps = self.log_probs[: self.prompt_len - 1]
            gen_lps = self.log_probs[self.prompt_len - 1 : self.prompt_len - 1 + len(self.generated)]
        prompt_top = gen_top = None
        if self.params.top_logprobs:
            prompt_top = self.top_log_probs[: self.prompt_len - 1]
            gen_top = self.top_log_probs[self.prompt_len - 1 : self.prompt_len - 1 + len(self.generated)]
        return GenerationResult(
            list(self.request.prompt_tokens), list(self.generated), prompt_lps, gen_lps, self.finish_reason,
            self.stop_string, prompt_top, gen_top,
        )

    def add_scored(self, log_probs: Sequence[float], top_values: Sequence[Sequence[float]],
                   top_ids: Sequence[Sequence[float]]) -> None:
        """Record the log-probs of the next scored positions and, when this request asks for
        them, their alternatives (rows of the batch's widest ``top_logprobs``, cut to its own)."""
        self.log_probs.extend(log_probs)
        k = self.params.top_logprobs
        if k:
            # entries of -inf pad a vocabulary smaller than the batch's widest k
            self.top_log_probs.extend([(int(t), float(v)) for t, v in zip(ids[:k], values[:k]) if v != float("-inf")]
                                      for values, ids in zip(top_values, top_ids))

    def append(self, token: int, detokenize) -> None:
        """Record a generated token; stop on a stop token or once the text holds a stop string."""
        self.generated.append(token)
        if token in self.params.stop_token_ids:
            self.done, self.finish_reason = True, "stop"
            return
        if self.params.stop_strings:
            text = detokenize(self.generated)
            for stop in self.params.stop_strings:
                if stop in text:
                    self.done, self.finish_reason, self.stop_string = True, "stop", stop
                    return
