"""RoPE and the norms against formulas written out independently.

Tolerance 1e-6: fp32 elementwise math on O(1) values, differing only in operation order.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb
from megatron.core.transformer.torch_norm import LayerNorm, RMSNorm, build_norm
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-6, rtol=1e-6)
S, B, N, D = 6, 2, 3, 16


def _rotate_pairs(t, rot_dim, base, pair_of):
    """Rotate pair i of each head by angle pos * base^(-2i/rot_dim); pair_of(i) -> (a, b) dims."""
    out = t.clone()
    for pos in range(t.shape[0]):
        for i in range(rot_dim // 2):
            angle = pos * base ** (-2 * i / rot_dim)
            a, b = pair_of(i)
            x, y = t[pos, ..., a], t[pos, ..., b]
            out[pos, ..., a] = x * math.cos(angle) - y * math.sin(angle)
            out[pos, ..., b] = x * math.sin(angle) + y * math.cos(angle)
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rotary_matches_pairwise_rotation(interleaved, percent):
    t = torch.randn(S, B, N, D, generator=torch.Generator().manual_seed(0))
    rope = RotaryEmbedding(D, percent, rotary_interleaved=interleaved, rotary_base=100)
    freqs = rope(S, device=torch.device("cpu"))
    rot_dim = int(D * percent)
    assert freqs.shape == (S, 1, 1, rot_dim)
    got = apply_rotary_pos_emb(t, freqs, rotary_interleaved=interleaved)
    pair_of = (lambda i: (2 * i, 2 * i + 1)) if interleaved else (lambda i: (i, i + rot_dim // 2))
    expected = _rotate_pairs(t, rot_dim, 100, pair_of)
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got[..., rot_dim:], t[..., rot_dim:])


def test_rotary_odd_dims_raise():
    with pytest.raises(ValueError, match="--rotary-percent"):
        RotaryEmbedding(10, 0.5)


def test_layernorm_and_rmsnorm_match_formulas():
    x = torch.randn(5, 2, 8)
    ln, rms = LayerNorm(8, eps=1e-5), RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        for norm in (ln, rms):
            norm.weight.normal_()
        ln.bias.normal_()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-5), **TOL)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight
    torch.testing.assert_close(rms(x), expected, **TOL)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_zero_centered_gamma_stores_gamma_minus_one(normalization):
    x = torch.randn(4, 8)
    plain = build_norm(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, normalization=normalization), 8)
    centered = build_norm(
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, normalization=normalization,
                          layernorm_zero_centered_gamma=True), 8)
    assert torch.equal(centered.weight, torch.zeros(8))
    with torch.no_grad():
        plain.weight.copy_(torch.linspace(0.5, 1.5, 8))
        centered.weight.copy_(torch.linspace(0.5, 1.5, 8) - 1)
    torch.testing.assert_close(centered(x), plain(x), **TOL)


def test_norm_output_dtype_and_sequence_parallel_marker():
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                               sequence_parallel=True, params_dtype=torch.bfloat16)
    norm = build_norm(config, 8)
    assert all(p.sequence_parallel for p in norm.parameters())
    assert norm(torch.randn(3, 8)).dtype == torch.bfloat16  # fp32 residual in, half out


def test_llama3_rope_scaling_regimes():
    """Short wavelengths kept, long ones stretched 8x, the middle blended (Llama 3.1)."""
    import math

    from megatron.core.models.common.embeddings.rotary_pos_embedding import llama3_scaled_inv_freq

    f = torch.tensor([2 * math.pi / 100, 2 * math.pi / 4096, 2 * math.pi / 10000])
    got = llama3_scaled_inv_freq(f, factor=8.0)
    # middle: smooth = (8192/4096 - 1) / (4 - 1) = 1/3 -> (2/3) f/8 + (1/3) f = f * 10/24
    expected = torch.tensor([f[0], f[1] * 10 / 24, f[2] / 8])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
