"""Core attention backends against a brute-force reference built from the mask rules.

Tolerance: fp32 softmax attention over 8-16 keys; backends only reorder the fp32 sums,
so they agree to ~1e-7; 1e-6 absolute/relative is above that and far below the effect
of one wrongly masked key (~1e-2).
"""

import math

import pytest
import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention, build_attention_mask
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

S, B, NP, NG, HN = 12, 2, 4, 2, 8
TOL = dict(atol=1e-6, rtol=1e-6)


def _config(backend, window=None, **kw):
    return TransformerConfig(
        num_layers=4, hidden_size=NP * HN, num_attention_heads=NP, num_query_groups=NG, attention_dropout=0.0,
        attention_backend=backend, window_size=window, **kw,
    )


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(S, B, NP, HN, generator=gen), torch.randn(S, B, NG, HN, generator=gen),
            torch.randn(S, B, NG, HN, generator=gen))


def _padding_mask(seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, S, S, generator=gen) < 0.3
    mask[..., 0] = False  # every query keeps key 0, so no row is fully masked
    return mask


def _reference(q, k, v, allowed):
    """allowed(b, i, j) -> bool; plain loops over the rule, K/V repeated per query head."""
    rep = NP // NG
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    out = torch.zeros(S, B, NP, HN)
    for b in range(B):
        for h in range(NP):
            scores = q[:, b, h] @ k[:, b, h].T / math.sqrt(HN)
            for i in range(S):
                for j in range(S):
                    if not allowed(b, i, j):
                        scores[i, j] = float("-inf")
            out[:, b, h] = torch.softmax(scores, dim=-1) @ v[:, b, h]
    return out.reshape(S, B, NP * HN)


CASES = {
    "causal": (AttnMaskType.causal, None, False, lambda m: lambda b, i, j: j <= i),
    "window": (AttnMaskType.causal, (3, 0), False, lambda m: lambda b, i, j: i - 3 <= j <= i),
    "padding": (AttnMaskType.padding, None, True, lambda m: lambda b, i, j: not m[b, 0, i, j]),
    "causal+padding": (AttnMaskType.causal, None, True, lambda m: lambda b, i, j: j <= i and not m[b, 0, i, j]),
    "no_mask": (AttnMaskType.no_mask, None, False, lambda m: lambda b, i, j: True),
}


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, case):
    mask_type, window, explicit, rule = CASES[case]
    q, k, v = _qkv()
    mask = _padding_mask() if explicit else None
    attention = DotProductAttention(_config(backend, window), layer_number=1, attn_mask_type=mask_type)
    got = attention(q, k, v, mask)
    torch.testing.assert_close(got, _reference(q, k, v, rule(mask)), **TOL)


def test_query_key_layer_scaling_keeps_the_math():
    q, k, v = _qkv()
    plain = DotProductAttention(_config("unfused"), layer_number=3)(q, k, v)
    scaled = DotProductAttention(_config("unfused", apply_query_key_layer_scaling=True), layer_number=3)
    assert scaled.coeff == 3.0
    torch.testing.assert_close(scaled(q, k, v), plain, **TOL)


def test_window_convention_matches_flash_attention():
    # (left=2, right=0): query 5 sees keys 3, 4, 5 (HF sliding_window=3)
    mask = build_attention_mask(8, 8, AttnMaskType.causal, None, (2, 0), torch.device("cpu"))
    assert [j for j in range(8) if not mask[0, 0, 5, j]] == [3, 4, 5]


def test_gradients_match_between_backends():
    grads = []
    for backend in ("sdpa", "unfused"):
        q, k, v = (t.requires_grad_() for t in _qkv())
        DotProductAttention(_config(backend, (4, 0)), layer_number=1)(q, k, v).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_backend_names_the_flag():
    with pytest.raises(ValueError, match="--attention-backend"):
        DotProductAttention(_config("warp-speed"), layer_number=1)
