"""Generation for one fixed batch of requests with a KV cache (Megatron's static engine).

The batch advances together. The first forward (prefill) runs every prompt's first
``min(prompt lengths)`` tokens at once; each later forward (decode) feeds one token per
sequence: the next prompt token for a sequence still inside its prompt, else the token
just chosen for it. So every sequence sits at the same position, no padding enters the
KV cache, and a batch of prompts of different lengths gives each prompt what it would
give alone (up to the float rounding of batched matmuls).

Every rank of the model-parallel group runs ``generate`` with the same requests; the
last pipeline stage chooses the tokens and ``ModelStep.share_from_last_stage`` hands them
to all ranks. Results are complete on every rank.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.cuda_graphs import DecodeGraph, decode_graph_supported
from megatron.core.inference.inference_request import GenerationResult, InferenceRequest
from megatron.core.inference.model_step import ModelStep
from megatron.core.inference.engines.request_state import RequestState
from megatron.core.inference.sampling import sample_batch, scored_alternatives, split_scored
from megatron.core.transformer.sliding_window import cache_window_size

logger = logging.getLogger(__name__)


class StaticInferenceEngine:
    """generate(requests) -> one GenerationResult per request, in order.

    ``max_batch_size`` and ``max_sequence_length`` bound one call (prompt + generated
    tokens of the longest request); ``vocab_size`` is the tokenizer's (the model's padded
    vocabulary entries beyond it are never chosen nor scored); ``detokenize`` (token ids
    -> text) is needed only for stop strings. ``use_cuda_graphs`` replays each decode step
    from a CUDA graph (``cuda_graphs``) where the model allows it; eager otherwise;
    ``compile_decode`` captures the decode step compiled by ``torch.compile`` in that graph.
    The last call's KV cache and graph are kept while the next call has the same batch
    size, longest request and log-prob setting: such a call replays the graph without a
    new capture (its cache is held between calls, one batch's worth).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int,
        max_sequence_length: int,
        vocab_size: Optional[int] = None,
        detokenize: Optional[Callable[[Sequence[int]], str]] = None,
        use_cuda_graphs: bool = False,
        compile_decode: bool = False,
    ):
        self.model = model
        self.model_step = ModelStep(model)
        self.use_cuda_graphs = False
        if use_cuda_graphs:
            reason = decode_graph_supported(model, self.model_step.model_parallel)
            if reason is None:
                self.use_cuda_graphs = True
            else:
                logger.warning("CUDA graphs of the decode step are off: %s; decoding eagerly", reason)
        self.compile_decode = compile_decode
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.detokenize = detokenize
        self.window_size = cache_window_size(model.config)
        self.device = next(model.parameters()).device
        # The last batch's context and decode graph, kept for a next batch of the same shape
        # (a capture costs tens of milliseconds: about a third of a 128-token call at batch 32).
        self._kept: Optional[Tuple[tuple, StaticInferenceContext, DecodeGraph]] = None

    def _check(self, requests: Sequence[InferenceRequest]) -> None:
        if not requests:
            raise ValueError("generate needs at least one request")
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed the engine's max_batch_size {self.max_batch_size}")
        for i, request in enumerate(requests):
            total = len(request.prompt_tokens) + request.sampling_params.num_tokens_to_generate
            if total > self.max_sequence_length:
                raise ValueError(
                    f"request {i}: {len(request.prompt_tokens)} prompt tokens + "
                    f"{request.sampling_params.num_tokens_to_generate} to generate exceed the maximum sequence "
                    f"length {self.max_sequence_length}"
                )
            if request.sampling_params.stop_strings and self.detokenize is None:
                raise ValueError("stop strings need an engine built with a detokenize function")

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[InferenceRequest],
        on_token: Optional[Callable[[int, int], None]] = None,
        cancelled: Optional[Callable[[], Sequence[bool]]] = None,
    ) -> List[GenerationResult]:
        """Run ``requests`` to completion. ``on_token(index, token)`` sees every generated
        token as soon as it is chosen (for streaming). ``cancelled()`` -> one bool per request,
        asked before every forward on the first model-parallel rank (its answer is shared with
        the others): a cancelled request stops with finish_reason "cancelled"."""
        self._check(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(list(requests), on_token, cancelled)
        finally:
            self.model.train(was_training)

    def _cancel(self, rows: List[RequestState], cancelled) -> None:
        asked = [bool(c) for c in cancelled()] if cancelled is not None else [False] * len(rows)
        if self.model_step.model_parallel:
            flags = torch.tensor(asked, dtype=torch.float64).to(self.device)
            asked = [bool(f) for f in self.model_step.share_from_first_rank(flags).tolist()]
        for row, flag in zip(rows, asked):
            if flag and not row.done:
                row.done, row.finish_reason = True, "cancelled"

    def _generate(self, requests: List[InferenceRequest], on_token=None, cancelled=None) -> List[GenerationResult]:
        """The device runs one forward ahead of the host's bookkeeping: forward k is queued
        (its input token already chosen on the device by forward k - 1) before the host
        reads forward k - 1's choices back, appends them, and checks stop tokens and
        strings. The host thus never holds the device up; a request that stops on a token
        costs at most one forward more, whose choice is dropped."""
        rows = [RequestState(r, self.device) for r in requests]
        max_total = max(max(row.total_len for row in rows), 1)
        tokens = torch.zeros(len(rows), max_total, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            tokens[i, : row.prompt_len] = torch.tensor(row.request.prompt_tokens, dtype=torch.long)
        want_log_probs = any(row.params.return_log_probs for row in rows)
        alternatives = max(row.params.top_logprobs for row in rows)
        context, graph = self._context(len(rows), max_total, want_log_probs)
        prev, cur = 0, min(row.prompt_len for row in rows)
        pending = None  # (choices on their way to the host, the positions they decide)
        while not all(row.done or row.total_len <= prev + 1 for row in rows):
            if cancelled is not None or self.model_step.model_parallel:
                self._cancel(rows, cancelled)
                if all(row.done for row in rows):
                    break
            positions = torch.arange(prev, cur, device=self.device).expand(len(rows), -1)
            if self.use_cuda_graphs and cur - prev == 1:
                if not context.fixed_shapes:
                    context.use_fixed_shapes(self.device)
                if graph is None:
                    graph = DecodeGraph(self.model, context, tokens[:, prev:cur], positions, self.compile_decode)
                    self._kept = ((len(rows), max_total, want_log_probs), context, graph)
                logits = graph(tokens[:, prev:cur], positions).float()
            else:
                logits = self.model_step(tokens[:, prev:cur], positions, context)
            context.increment(cur - prev)
            active = [row.prompt_len <= cur < row.total_len for row in rows]
            decided = self._decide(logits, tokens, prev, cur, rows, active, want_log_probs, max_total, alternatives)
            decided = self.model_step.share_from_last_stage(decided)
            if cur < max_total:
                tokens[:, cur] = decided[:, 0].to(torch.long)
            if pending is not None:
                self._record(*pending, rows, want_log_probs, alternatives, on_token)
            pending = (_to_host(decided), prev, cur)
            prev, cur = cur, cur + 1
        if pending is not None:
            self._record(*pending, rows, want_log_probs, alternatives, on_token)
        return [row.result() for row in rows]

    def _context(self, batch: int, max_total: int, want_log_probs: bool):
        """(a KV cache for this batch, the decode graph captured over it or None). With CUDA
        graphs, a batch of the last one's shape reuses its context and graph; any other
        shape frees them first (one batch's cache is held at a time)."""
        key = (batch, max_total, want_log_probs)
        if self._kept is not None and self._kept[0] == key:
            _, context, graph = self._kept
            context.reset()
            return context, graph
        self._kept = None
        context = StaticInferenceContext(batch, max_total, self.window_size)
        context.materialize_only_last_token_logits = not want_log_probs
        return context, None

    def _decide(self, logits, tokens, prev, cur, rows, active, want_log_probs, max_total, alternatives
                ) -> torch.Tensor:
        """float64 [b, 1 + n (1 + 2 k)]: column 0 the token at position ``cur`` (when cur <
        max_total), then (with log-probs) the log-probs of positions prev+1 .. min(cur,
        max_total - 1), then (``alternatives`` k > 0) each of those positions' k best
        log-probs and their token ids (``scored_alternatives``). ``active``: one bool per
        row, the rows choosing a token at ``cur`` (past their prompt); the others keep their
        prompt's token."""
        n_scored = min(cur, max_total - 1) - prev if want_log_probs else 0
        decided = torch.zeros(len(rows), 1 + n_scored * (1 + 2 * alternatives), dtype=torch.float64,
                              device=self.device)
        if logits is None:
            return decided  # not the last pipeline stage: filled by the broadcast
        if self.vocab_size is not None:
            logits = logits[..., : self.vocab_size]
        next_tokens = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        if cur < max_total:
            sampled = sample_batch(logits[:, -1], [r.params for r in rows], [r.generator for r in rows], active)
            chosen = torch.tensor(active, dtype=torch.bool).to(self.device, non_blocking=True)
            next_tokens = torch.where(chosen, sampled, tokens[:, cur])
        decided[:, 0] = next_tokens.to(torch.float64)
        if n_scored:
            targets = torch.cat([tokens[:, prev + 1 : cur], next_tokens[:, None]], dim=1)[:, :n_scored]
            log_probs = torch.log_softmax(logits[:, :n_scored], dim=-1)
            decided[:, 1:1 + n_scored] = torch.gather(log_probs, 2, targets[:, :, None])[:, :, 0].to(torch.float64)
            if alternatives:
                decided[:, 1 + n_scored:] = scored_alternatives(log_probs, alternatives).flatten(1)
        return decided

    def _record(self, host_decided, prev, cur, rows, want_log_probs, alternatives, on_token) -> None:
        """The host's bookkeeping of the forward that decided position ``cur``."""
        values, ready = host_decided
        if ready is not None:
            ready.synchronize()
        n_scored = (values.shape[1] - 1) // (1 + 2 * alternatives)
        for i, row in enumerate(rows):
            if want_log_probs:
                row.add_scored(*split_scored(values[i, 1:].tolist(), n_scored, alternatives))
            if row.done:
                continue
            if row.prompt_len <= cur < row.total_len:
                row.append(int(values[i, 0]), self.detokenize)
                if on_token is not None:
                    on_token(i, row.generated[-1])
            if cur + 1 >= row.total_len:
                row.done = True


def _to_host(values: torch.Tensor):
    """(a host copy of ``values`` on its way, the event that says it has arrived or None)."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
