"""Attention dropout in the ring attention: the forward drops the probabilities of each
block with a seeded mask and the backward redraws the same mask.

One process, a ring of one member with the sequence in two segments (so the block is
planned and merged as on a real ring), against plain autograd math that applies the
mask the ring draws (same seed, drawn from the same RNG state). fp32; tolerance 1e-5 as
in test_cp_attention: a backward that forgot the mask (or used another one) is off by
O(1) (test_backward_without_the_mask_is_caught)."""

import torch

from megatron.core.transformer.context_parallel import block_math
from megatron.core.transformer.context_parallel.p2p import Ring, ring_attention

P = 0.3
B, NG, G, S, HN = 2, 2, 2, 12, 8


def _inputs():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, NG, G, S, HN, generator=gen)
    k = torch.randn(B, NG, 1, S, HN, generator=gen)
    v = torch.randn(B, NG, 1, S, HN, generator=gen)
    dout = torch.randn(B, NG, G, S, HN, generator=gen)
    return q, k, v, dout


def _reference(q, k, v, dout, keep_scale):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) / HN**0.5
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, -float("inf")), dim=-1)
    out = torch.matmul(probs * keep_scale, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ring_run(q, k, v, dout):
    ring = Ring(group=None, members=[0], index=0, segments=[[(0, S // 2), (S // 2, S // 2)]])
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(11)
    out = ring_attention(q, k, v, ring, True, None, HN**-0.5, P)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _mask_the_ring_draws():
    torch.manual_seed(11)
    seed = int(torch.randint(0, 1 << 62, (1,)).item())
    return block_math.dropout_keep_scale((B, NG, G, S, S), P, seed * 1000003, torch.device("cpu"))


def test_ring_dropout_matches_masked_reference():
    q, k, v, dout = _inputs()
    got = _ring_run(q, k, v, dout)
    want = _reference(q, k, v, dout, _mask_the_ring_draws())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max() < 1e-5, name
    # Dropout really happened: the undropped output differs.
    plain = _reference(q, k, v, dout, torch.ones(1))[0]
    assert (got[0] - plain).abs().max() > 1e-2


def test_backward_without_the_mask_is_caught():
    q, k, v, dout = _inputs()
    got = _ring_run(q, k, v, dout)
    wrong = _reference(q, k, v, dout, _mask_the_ring_draws().roll(1, dims=-1))
    assert max((a - b).abs().max() for a, b in zip(got[1:], wrong[1:])) > 1e-2
