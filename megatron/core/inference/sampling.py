"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Every function here takes fp32 logits [V] or [b, V] over the real vocabulary (padding
entries already cut off by the caller).
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from megatron.core.inference.sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> temperature-scaled logits with everything outside top-k / top-p at -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the probability of the tokens before it is below top_p:
        # the smallest prefix reaching top_p, and always the most likely token.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A generator of its own for a seeded request, None (the global RNG) otherwise."""
    if params.random_seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(int(params.random_seed))


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """The next token for logits [V] under ``params``."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor,
    params: List[SamplingParams],
    generators: List[Optional[torch.Generator]],
    active: Union[List[bool], torch.Tensor],
) -> torch.Tensor:
    """logits [b, V] -> tokens [b] (int64, on logits' device); inactive rows get 0.

    ``active``: one bool per row, a list or a bool tensor on logits' device. Greedy rows
    never wait for the device (the list goes over with a non-blocking copy); sampled rows
    read each row's choice back to the host."""
    if isinstance(active, torch.Tensor):
        greedy = all(p.greedy for p in params)
    else:
        greedy = all(p.greedy for p, a in zip(params, active) if a)
        active = torch.tensor(active, dtype=torch.bool).to(logits.device, non_blocking=True)
    if greedy:
        tokens = torch.argmax(logits, dim=-1)
        return torch.where(active, tokens, torch.zeros_like(tokens))
    rows = active.tolist()
    chosen = [sample_one(logits[i], params[i], generators[i]) if rows[i] else 0 for i in range(logits.shape[0])]
    return torch.tensor(chosen, dtype=torch.long).to(logits.device)
