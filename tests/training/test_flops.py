"""Megatron's FLOP count (megatron-facts section 7.3)."""

from types import SimpleNamespace

from megatron.training.flops import num_floating_point_operations


def _args(**kw):
    base = dict(seq_length=2048, num_layers=24, hidden_size=1024, padded_vocab_size=50304,
                ffn_hidden_size=4096, num_attention_heads=16, num_query_groups=16, kv_channels=64,
                group_query_attention=False, swiglu=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_matches_closed_form_for_plain_gpt():
    """With f = 4h, q = h, g = n: 72 B s L h^2 (1 + s/(12h) + V/(12 L h))."""
    a = _args()
    B, s, L, h, V = 8, a.seq_length, a.num_layers, a.hidden_size, a.padded_vocab_size
    expected = 72 * B * s * L * h * h * (1 + s / (12 * h) + V / (12 * L * h))
    assert abs(num_floating_point_operations(a, B) - expected) <= 1e-9 * expected


def test_gqa_and_swiglu_terms():
    a = _args(group_query_attention=True, num_query_groups=4, swiglu=True, ffn_hidden_size=5632)
    s, L, h, V, f, n, g, d = 2048, 24, 1024, 50304, 5632, 16, 4, 64
    per_token = 12 * L * h * f * 1.5 + 12 * L * h * d * n * (1 + g / n) + 6 * L * d * n * s + 6 * h * V
    assert num_floating_point_operations(a, 1) == s * per_token
