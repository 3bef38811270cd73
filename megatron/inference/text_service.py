"""The serving side of generation: tokenizer, engine, limits and the lock in front of them.

One request runs at a time (the engine holds one batch); concurrent HTTP clients queue on
``_lock`` in arrival order of the threads that serve them. A request with more prompts
than the engine's batch runs as several batches, one after another, under the same lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, List, Optional, Sequence

from megatron.core.inference import GenerationResult, InferenceRequest, StaticInferenceEngine
from megatron.inference.errors import RequestError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServingLimits:
    """Per-request limits (flags of the server; see server_args)."""

    max_prompts: int = 128
    max_sequence_length: int = 2560
    max_tokens_to_oom: int = 12000
    max_body_bytes: int = 8 * 1024 * 1024


class TextGenerationService:
    """Text in, text out, over one engine. ``leader`` (rank_roles.Leader) is set when other
    ranks must run every batch too."""

    def __init__(self, engine: StaticInferenceEngine, tokenizer, limits: ServingLimits, model_name: str = "megatron",
                 leader=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_name = model_name
        self.leader = leader
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.active_requests = 0
        self.cancelled_requests = 0

    # --- text <-> tokens ---------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False) -> List[int]:
        ids = list(self.tokenizer.tokenize(text))
        bos = getattr(self.tokenizer, "bos", None)
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(ids))

    def continuation_text(self, prompt: Sequence[int], generated: Sequence[int]) -> str:
        """The text ``generated`` adds after ``prompt`` (detokenized in context, so that a
        word-piece or a leading space joins the prompt as it would in the full text)."""
        if not generated:
            return ""
        before = self.detokenize(prompt)
        full = self.detokenize(list(prompt) + list(generated))
        return full[len(before):] if full.startswith(before) else self.detokenize(generated)

    @property
    def eod(self) -> Optional[int]:
        return getattr(self.tokenizer, "eod", None)

    @property
    def has_bos(self) -> bool:
        return getattr(self.tokenizer, "bos", None) is not None

    def chat_prompt(self, messages: List[dict]) -> List[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, ready for the
        assistant's reply; 400 when the tokenizer has none."""
        hf = getattr(self.tokenizer, "hf_tokenizer", None)
        if hf is None or not getattr(hf, "chat_template", None):
            raise RequestError(
                "this model's tokenizer has no chat template, so /v1/chat/completions cannot build a prompt: "
                "use /v1/completions with a prompt string, or serve with --tokenizer-type HuggingFaceTokenizer "
                "and a tokenizer directory whose tokenizer_config.json has a chat_template",
                field="messages",
            )
        try:
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own error types for messages the template rejects
            raise RequestError(f"the chat template rejected these messages: {err}", field="messages") from err
        return list(hf.encode(text, add_special_tokens=False))

    # --- limits ---------------------------------------------------------------------------
    def check(self, prompts: List[List[int]], tokens_to_generate: Sequence[int], prompt_field: str,
              tokens_field: str) -> None:
        """RequestError naming the field when a request cannot run within the limits."""
        if len(prompts) > self.limits.max_prompts:
            raise RequestError(f"{prompt_field}: {len(prompts)} prompts exceed the maximum of {self.limits.max_prompts} per request",
                               field=prompt_field)
        max_len = min(self.limits.max_sequence_length, self.engine.max_sequence_length)
        for i, (prompt, n) in enumerate(zip(prompts, tokens_to_generate)):
            if not prompt:
                raise RequestError(f"{prompt_field}[{i}] is empty (no tokens): send text, or set add_BOS to start from BOS",
                                   field=prompt_field)
            if len(prompt) >= max_len and n > 0 or len(prompt) > max_len:
                raise RequestError(f"{prompt_field}[{i}] has {len(prompt)} tokens, more than the context of {max_len} "
                                   "tokens allows", field=prompt_field)
            if len(prompt) + n > max_len:
                raise RequestError(f"{tokens_field}={n} with {prompt_field}[{i}] of {len(prompt)} tokens exceeds the maximum "
                                   f"sequence length {max_len}: ask for at most {max_len - len(prompt)}",
                                   field=tokens_field)
        batch = self.engine.max_batch_size
        for start in range(0, len(prompts), batch):
            chunk = range(start, min(start + batch, len(prompts)))
            longest = max(len(prompts[i]) + tokens_to_generate[i] for i in chunk)
            if longest * len(chunk) > self.limits.max_tokens_to_oom:
                raise RequestError(f"{len(chunk)} prompts x {longest} tokens exceed --max-tokens-to-oom "
                                   f"{self.limits.max_tokens_to_oom}: send fewer or shorter prompts or ask for fewer "
                                   "tokens", field=tokens_field)

    # --- running ---------------------------------------------------------------------------
    def generate(self, requests: List[InferenceRequest], on_token: Optional[Callable[[int, int], None]] = None,
                 cancelled: Optional[Callable[[], Sequence[bool]]] = None) -> List[GenerationResult]:
        """Run ``requests`` (in batches of the engine's size) once the engine is free."""
        with self._counter_lock:
            self.active_requests += 1
        try:
            with self._lock:
                results = self._run_batches(requests, on_token, cancelled)
        finally:
            with self._counter_lock:
                self.active_requests -= 1
        if any(r.finish_reason == "cancelled" for r in results):
            with self._counter_lock:
                self.cancelled_requests += 1
        return results

    def _run_batches(self, requests, on_token, cancelled) -> List[GenerationResult]:
        results: List[GenerationResult] = []
        batch = self.engine.max_batch_size
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            token_cb = None if on_token is None else (lambda i, t, s=start: on_token(s + i, t))
            cancel_cb = None if cancelled is None else (lambda s=start, n=len(chunk): list(cancelled())[s:s + n])
            if self.leader is not None:
                self.leader.announce(chunk)
            results.extend(self.engine.generate(chunk, on_token=token_cb, cancelled=cancel_cb))
        return results
