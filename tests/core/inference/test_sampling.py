"""Batched sampling: the filters against a per-row loop written from their definitions, the
draw's distribution, seeds, greedy and inactive rows."""

import pytest
import torch

from megatron.core.inference.sampling import make_generator, sample_batch, sorted_filtered_logits
from megatron.core.inference.sampling_params import SamplingParams


def _kept_reference(logits: torch.Tensor, params: SamplingParams) -> set:
    """The tokens a row may draw, from the definitions: divide by the temperature; top-k
    keeps every value at least the k-th largest; top-p keeps, in descending order, each
    token while the probability of the tokens before it (after top-k) is below p."""
    scaled = [float(v) / params.temperature for v in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = list(order)
    if 0 < params.top_k < len(scaled):
        kth = scaled[order[params.top_k - 1]]
        kept = [i for i in order if scaled[i] >= kth]
    if 0.0 < params.top_p < 1.0:
        weights = torch.softmax(torch.tensor([scaled[i] for i in kept], dtype=torch.float64), dim=0).tolist()
        before, chosen = 0.0, []
        for i, w in zip(kept, weights):
            if before >= params.top_p:
                break
            chosen.append(i)
            before += w
        kept = chosen
    return set(kept)


def _settings(params):
    return (torch.tensor([p.temperature for p in params]), torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]))


def test_filters_keep_what_the_definitions_keep():
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t in (0.5, 1.0, 2.0) for k in (0, 1, 5, 40) for p in (0.0, 0.3, 0.9, 1.0)]
    logits = torch.randn(len(params), 40, generator=gen) * 3
    logits[:, 7] = logits[:, 8]  # ties at the k-th value stay together
    values, order = sorted_filtered_logits(logits, *_settings(params))
    for row, p in enumerate(params):
        kept = {int(order[row, j]) for j in range(40) if torch.isfinite(values[row, j])}
        assert kept == _kept_reference(logits[row], p), p
        finite = torch.isfinite(values[row])
        torch.testing.assert_close(values[row][finite], (logits[row] / p.temperature)[order[row][finite]])


def test_draws_follow_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.0)
    expected = torch.softmax(torch.cat([logits[:4] / 0.8, torch.full((2,), float("-inf"))]), dim=0)
    n = 40000
    tokens = sample_batch(logits.expand(n, -1), [params] * n, [None] * n, [True] * n)
    frequencies = torch.bincount(tokens, minlength=6).double() / n
    torch.testing.assert_close(frequencies, expected.double(), atol=0.01, rtol=0)
    assert frequencies[4:].sum() == 0


def test_top_p_draws_only_the_nucleus():
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(top_p=0.7)  # 0.5 < 0.7, 0.8 >= 0.7: the first two
    tokens = sample_batch(logits.expand(20000, -1), [params] * 20000, [None] * 20000, [True] * 20000)
    frequencies = torch.bincount(tokens, minlength=4).double() / 20000
    torch.testing.assert_close(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64),
                               atol=0.015, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(2)
    steps = [torch.randn(3, 50, generator=gen) for _ in range(6)]
    seeded = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, random_seed=7)
    others = [SamplingParams(temperature=1.0), SamplingParams(top_k=1)]

    def run(with_others):
        params = [seeded] + (others if with_others else [])
        generators = [make_generator(p, torch.device("cpu")) for p in params]
        return [int(sample_batch(s[:len(params)], params, generators, [True] * len(params))[0]) for s in steps]

    alone = run(False)
    assert run(True) == alone == run(False)
    reseeded = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, random_seed=8)
    generator = make_generator(reseeded, torch.device("cpu"))
    assert [int(sample_batch(s[:1], [reseeded], [generator], [True])[0]) for s in steps] != alone


def test_greedy_and_inactive_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    params = [SamplingParams(top_k=1), SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    tokens = sample_batch(logits, params, [None] * 3, [True, True, False])
    assert tokens.tolist() == [1, 0, 0]


@pytest.mark.parametrize("top_k", [0, 3])
def test_a_sampled_row_never_draws_a_filtered_token(top_k):
    torch.manual_seed(3)
    logits = torch.randn(4000, 30)
    params = [SamplingParams(temperature=1.7, top_k=top_k, top_p=0.5)] * 4000
    tokens = sample_batch(logits, params, [None] * 4000, [True] * 4000)
    for row in range(0, 4000, 97):
        assert int(tokens[row]) in _kept_reference(logits[row], params[row])
