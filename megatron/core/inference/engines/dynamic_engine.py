"""Continuous batching: requests join and leave a running batch; a paged KV cache;
chunked prefill.

Each ``step`` packs, within ``max_tokens_per_step`` tokens: one token for every running
request that is decoding, then the next chunk of the prompt of each request still in
prefill, then (while fewer than ``max_requests`` run and the block pool can hold their
whole prompt + generation) newly admitted requests. One forward runs them all; each
request whose known tokens are all in the cache gets its next token. A request's blocks
are reserved for its whole length on admission (no preemption is needed) and returned
when it finishes.

Every rank of the model-parallel group must make the same ``add_request`` / ``step``
calls; the last stage's choices reach all ranks as in the static engine.
"""

from __future__ import annotations

import collections
import itertools
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
from megatron.core.inference.engines.request_state import RequestState
from megatron.core.inference.inference_request import GenerationResult, InferenceRequest
from megatron.core.inference.model_step import ModelStep
from megatron.core.inference.sampling import sample_batch, scored_alternatives, split_scored
from megatron.core.transformer.sliding_window import cache_window_size


class _Running(RequestState):
    """A request in the dynamic engine: all its tokens so far and how many are cached."""

    def __init__(self, request: InferenceRequest, device: torch.device):
        super().__init__(request, device)
        self.tokens: List[int] = list(request.prompt_tokens)
        self.cached = 0

    @property
    def finished(self) -> bool:
        # the last token's own logits are never needed, so it need not enter the cache
        return self.done or (len(self.tokens) >= self.total_len and self.cached >= len(self.tokens) - 1)


class DynamicInferenceEngine:
    """add_request(request) -> id; step() -> [(id, GenerationResult)] of the requests that
    finished in it; generate(requests) runs a list to completion."""

    def __init__(self, model: torch.nn.Module, max_requests: int, num_blocks: int, block_size: int = 256,
                 max_tokens_per_step: int = 512, max_sequence_length: int = 4096, vocab_size: Optional[int] = None,
                 detokenize: Optional[Callable[[Sequence[int]], str]] = None):
        if max_requests < 1 or max_tokens_per_step < 1:
            raise ValueError(f"max_requests and max_tokens_per_step must be >= 1, got {max_requests}, {max_tokens_per_step}")
        self.model = model
        self.model_step = ModelStep(model)
        self.device = next(model.parameters()).device
        self.context = DynamicInferenceContext(num_blocks, block_size, cache_window_size(model.config))
        self.max_requests = max_requests
        self.max_tokens_per_step = max_tokens_per_step
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.detokenize = detokenize
        self.waiting: Deque[int] = collections.deque()
        self.running: List[int] = []
        self.states: Dict[int, _Running] = {}
        self._ids = itertools.count()
        # Sees (request id, token) for every generated token as it is chosen (streaming).
        self.on_token: Optional[Callable[[int, int], None]] = None

    @property
    def max_batch_size(self) -> int:
        return self.max_requests

    def cancel(self, request_id: int) -> None:
        """Stop a request: it finishes at the next ``step`` with finish_reason "cancelled"."""
        state = self.states.get(request_id)
        if state is not None and not state.done:
            state.done, state.finish_reason = True, "cancelled"

    def add_request(self, request: InferenceRequest) -> int:
        total = len(request.prompt_tokens) + request.sampling_params.num_tokens_to_generate
        if total > self.max_sequence_length:
            raise ValueError(f"{len(request.prompt_tokens)} prompt tokens + {request.sampling_params.num_tokens_to_generate} "
                             f"to generate exceed the maximum sequence length {self.max_sequence_length}")
        if self.context.blocks_needed(-1, total) > self.context.num_blocks:
            raise ValueError(f"a request of {total} tokens needs more KV blocks than the pool has ({self.context.num_blocks})")
        if request.sampling_params.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenize function")
        request_id = next(self._ids)
        self.states[request_id] = _Running(request, self.device)
        self.waiting.append(request_id)
        return request_id

    def abort_all(self) -> None:
        """Drop every request and return all blocks (after a failed step)."""
        for request_id in list(self.running):
            self.context.release(request_id)
        self.waiting.clear()
        self.running.clear()
        self.states.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _schedule(self) -> List[Tuple[int, int, int]]:
        """(request id, first position, token count) of every run of this step."""
        budget, plan = self.max_tokens_per_step, []
        for request_id in self.running:  # decoding requests first: one token each
            state = self.states[request_id]
            if state.cached >= state.prompt_len and budget > 0 and not state.done:
                plan.append((request_id, state.cached, 1))
                budget -= 1
        for request_id in self.running:  # then the prefill chunks already under way
            state = self.states[request_id]
            if state.cached < state.prompt_len and budget > 0 and not state.done:
                n = min(len(state.tokens) - state.cached, budget)
                plan.append((request_id, state.cached, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_requests:
            state = self.states[self.waiting[0]]
            if self.context.blocks_needed(self.waiting[0], state.total_len) > len(self.context.free_blocks):
                break  # admitted in order: wait for blocks to be released
            request_id = self.waiting.popleft()
            self.context.reserve(request_id, state.total_len)
            self.running.append(request_id)
            n = min(len(state.tokens), budget)
            plan.append((request_id, 0, n))
            budget -= n
        return plan

    @torch.no_grad()
    def step(self) -> List[Tuple[int, GenerationResult]]:
        """One forward over the scheduled tokens; returns the requests that finished."""
        self.model.eval()
        finished = []
        for request_id in [r for r in self.waiting if self.states[r].done]:  # cancelled before admission
            self.waiting.remove(request_id)
            finished.append((request_id, self.states.pop(request_id).result()))
        plan = self._schedule()
        if plan:
            tokens = torch.tensor([t for rid, start, n in plan for t in self.states[rid].tokens[start:start + n]],
                                  dtype=torch.long, device=self.device).unsqueeze(0)
            positions = self.context.begin_step(plan, self.device)
            logits = self.model_step(tokens, positions, self.context)
            decided = self.model_step.share_from_last_stage(self._decide(logits, plan))
            self._record(decided, plan)
        for request_id in list(self.running):
            state = self.states[request_id]
            if state.finished:
                self.running.remove(request_id)
                self.context.release(request_id)
                finished.append((request_id, self.states.pop(request_id).result()))
        return finished

    def _needs_token(self, state: _Running, start: int, n: int) -> bool:
        return start + n == len(state.tokens) and len(state.tokens) < state.total_len and not state.done

    def _widths(self, plan) -> Tuple[int, List[int]]:
        """(the plan's widest ``top_logprobs`` k, each run's width in the shared tensor:
        1 + n (1 + 2 k))."""
        k = max(self.states[rid].params.top_logprobs for rid, _, _ in plan)
        return k, [1 + n * (1 + 2 * k) for _, _, n in plan]

    def _decide(self, logits, plan) -> torch.Tensor:
        """float64 [sum of run widths]: per run, the next token (0 when none), the log-probs
        of the positions its logits predict (start + 1 .. start + n), then (when a request of
        the plan asks for ``top_logprobs`` k) those positions' k best log-probs and ids."""
        k, widths = self._widths(plan)
        decided = torch.zeros(sum(widths), dtype=torch.float64, device=self.device)
        if logits is None:
            return decided  # not the last pipeline stage: filled by the broadcast
        logits = logits[0] if self.vocab_size is None else logits[0, :, : self.vocab_size]
        last = [offset + n - 1 for offset, (_, _, n) in zip(self._offsets(plan), plan)]
        states = [self.states[rid] for rid, _, _ in plan]
        active = [self._needs_token(s, start, n) for s, (_, start, n) in zip(states, plan)]
        sampled = sample_batch(logits[last], [s.params for s in states], [s.generator for s in states], active)
        log_probs = torch.log_softmax(logits, dim=-1) if any(s.params.return_log_probs for s in states) else None
        at = 0
        for i, ((rid, start, n), offset) in enumerate(zip(plan, self._offsets(plan))):
            decided[at] = float(sampled[i])
            if log_probs is not None:
                state = states[i]
                known = state.tokens[start + 1:start + n + 1] + ([int(sampled[i])] if active[i] else [])
                targets = torch.tensor(known[:n], dtype=torch.long, device=self.device)
                decided[at + 1:at + 1 + len(targets)] = log_probs[offset:offset + len(targets)].gather(
                    1, targets[:, None])[:, 0].to(torch.float64)
                if k:
                    decided[at + 1 + n:at + widths[i]] = scored_alternatives(log_probs[offset:offset + n], k).flatten()
            at += widths[i]
        return decided

    @staticmethod
    def _offsets(plan) -> List[int]:
        return list(itertools.accumulate([n for _, _, n in plan], initial=0))[:-1]

    def _record(self, decided: torch.Tensor, plan) -> None:
        values = decided.cpu().tolist()
        k, widths = self._widths(plan)
        at = 0
        for (rid, start, n), width in zip(plan, widths):
            state = self.states[rid]
            needs_token = self._needs_token(state, start, n)
            scored = min(n, len(state.tokens) - start - 1 + int(needs_token))
            log_probs, top_values, top_ids = split_scored(values[at + 1:at + width], n, k)
            state.add_scored(log_probs[:scored], top_values[:scored], top_ids[:scored])
            state.cached = start + n
            if needs_token:
                token = int(values[at])
                state.tokens.append(token)
                state.append(token, self.detokenize)
                if self.on_token is not None:
                    self.on_token(rid, token)
            at += width

    def generate(self, requests: Sequence[InferenceRequest]) -> List[GenerationResult]:
        ids = [self.add_request(r) for r in requests]
        results: Dict[int, GenerationResult] = {}
        while self.has_unfinished_requests():
            results.update(self.step())
        return [results[i] for i in ids]
