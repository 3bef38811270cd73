"""Choosing the next token of every row of a batch from its logits: greedy, temperature,
top-k, top-p, all rows at once on the logits' device.

Every row has its own settings (``SamplingParams``). The rows are filtered together from
one descending sort: temperature scales the logits, top-k keeps the values at least as
large as the k-th (ties included), top-p keeps the smallest prefix of the sorted
distribution (after top-k) whose probability reaches p, and always the most likely token.
Then each sampled row draws one uniform number and takes the token where the cumulative
probability of the sorted kept tokens passes it (inverse-CDF sampling). A seeded row
draws its number from its own generator, so its tokens do not depend on the other rows;
the others draw from the global generator. Nothing here reads a value back to the host.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron.core.inference.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A generator of its own for a seeded request, None (the global RNG) otherwise."""
    if params.random_seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(int(params.random_seed))


def _settings(params: List[SamplingParams], device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Per-row temperature, top-k and top-p as tensors on ``device`` (greedy rows get
    harmless neutral values: their token is the argmax)."""
    temperature = [p.temperature if not p.greedy else 1.0 for p in params]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    return (torch.tensor(temperature, dtype=torch.float32).to(device, non_blocking=True),
            torch.tensor(top_k, dtype=torch.long).to(device, non_blocking=True),
            torch.tensor(top_p, dtype=torch.float32).to(device, non_blocking=True))


def sorted_filtered_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [b, V] and per-row settings [b] -> (the scaled logits sorted descending
    with the filtered-out ones at -inf, the vocabulary index of each sorted entry), [b, V].
    top_k 0 or >= V: no cut; top_p 0 or 1: no cut."""
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    values, order = torch.sort(scaled, dim=-1, descending=True)
    cut_k = (top_k > 0) & (top_k < vocab)
    kth = values.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])  # [b, 1]
    values = values.masked_fill(cut_k[:, None] & (values < kth), float("-inf"))
    probs = torch.softmax(values, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    cut_p = (top_p > 0.0) & (top_p < 1.0)
    values = values.masked_fill(cut_p[:, None] & (before >= top_p[:, None]), float("-inf"))
    return values, order


def sample_batch(
    logits: torch.Tensor,
    params: List[SamplingParams],
    generators: List[Optional[torch.Generator]],
    active: List[bool],
) -> torch.Tensor:
    """fp32 logits [b, V] over the real vocabulary -> tokens [b] (int64, on logits' device);
    rows not ``active`` get 0, and a seeded row draws from its generator only when active
    (once per token it generates). Never waits for the device."""
    device = logits.device
    tokens = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        temperature, top_k, top_p = _settings(params, device)
        values, order = sorted_filtered_logits(logits, temperature, top_k, top_p)
        cdf = torch.cumsum(torch.softmax(values, dim=-1), dim=-1)  # [b, V], kept tokens first
        uniform = _uniforms(params, generators, active, device)
        # The first sorted entry whose cumulative probability exceeds the draw (the last
        # kept one if rounding leaves the total a hair below it).
        rank = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        kept = torch.isfinite(values).sum(dim=-1)
        drawn = order.gather(1, torch.minimum(rank, kept - 1)[:, None])[:, 0]
        greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool).to(device, non_blocking=True)
        tokens = torch.where(greedy, tokens, drawn)
    mask = torch.tensor(active, dtype=torch.bool).to(device, non_blocking=True)
    return torch.where(mask, tokens, torch.zeros_like(tokens))


def _uniforms(params: List[SamplingParams], generators: List[Optional[torch.Generator]], active: List[bool],
              device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row: an active seeded row's from its own generator
    (one draw per generated token, whatever the batch), the others' from the global one."""
    uniform = torch.rand(len(params), device=device)
    for i, generator in enumerate(generators):
        if generator is not None and active[i] and not params[i].greedy:
            uniform[i:i + 1] = torch.rand(1, device=device, generator=generator)
    return uniform


def scored_alternatives(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """float64 [..., n, 2, k] of log-probs [..., n, V]: each position's k best log-probs
    (best first), then their token ids (exact as float64), for the engines' shared tensor."""
    values, ids = log_probs.topk(min(k, log_probs.size(-1)), dim=-1)
    if values.size(-1) < k:  # a vocabulary smaller than k: pad with impossible entries
        pad = k - values.size(-1)
        values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
    return torch.stack([values.to(torch.float64), ids.to(torch.float64)], dim=-2)


def split_scored(values: List[float], n: int, k: int):
    """(log-probs, alternatives' log-probs, alternatives' ids) of ``n`` scored positions laid
    out as [n log-probs | n x (k log-probs, k ids)] (``scored_alternatives``)."""
    log_probs = values[:n]
    rest = values[n:n + 2 * n * k]
    top_values = [rest[2 * k * j:2 * k * j + k] for j in range(n)]
    top_ids = [rest[2 * k * j + k:2 * k * (j + 1)] for j in range(n)]
    return log_probs, top_values, top_ids
