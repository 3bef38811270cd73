"""Fused rotary embedding equals the reference (forward and input grad), for the
half-rotation and interleaved layouts and partial rotary dims.

Tolerance 1e-6: fp32 elementwise math on O(1) values.
"""

import pytest
import torch

from megatron.core.fusions.fused_rope import fused_rope, rope_reference
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-6, rtol=1e-6)
S, B, N, D = 8, 2, 3, 16


def _run(rope, t, freqs, interleaved):
    t = t.detach().clone().requires_grad_()
    out = rope(t, freqs, interleaved, 1.0)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    (out * weight).sum().backward()
    return out.detach(), t.grad


def _check(interleaved, percent, dtype=torch.float32, device="cpu", **tol):
    freqs = RotaryEmbedding(D, percent, rotary_interleaved=interleaved)(S + 4, device=device)  # longer than s
    t = torch.randn(S, B, N, D, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    for got, want in zip(_run(fused_rope, t, freqs, interleaved), _run(rope_reference, t, freqs, interleaved)):
        torch.testing.assert_close(got, want, **(tol or TOL))


def test_inductor_rope_matches_reference(compiled):
    _check(interleaved=False, percent=0.5)


@pytest.mark.parametrize("interleaved, percent", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_traced_rope_variants_match_reference(traced, interleaved, percent):
    _check(interleaved, percent)


def test_apply_rotary_pos_emb_follows_apply_rope_fusion(monkeypatch):
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    calls = []
    monkeypatch.setattr(rotary_pos_embedding, "fused_rope", lambda *a: calls.append(a) or rope_reference(*a))
    config = TransformerConfig(num_layers=1, hidden_size=D * N, num_attention_heads=N)
    t, freqs = torch.randn(S, B, N, D), RotaryEmbedding(D, 1.0)(S)
    fused = apply_rotary_pos_emb(t, freqs, config)
    assert len(calls) == 1
    config.apply_rope_fusion = False
    torch.testing.assert_close(apply_rotary_pos_emb(t, freqs, config), fused, **TOL)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_cuda_fused_rope_matches_reference(interleaved):
    _check(interleaved, 1.0, dtype=torch.bfloat16, device="cuda", atol=2e-2, rtol=2e-2)
