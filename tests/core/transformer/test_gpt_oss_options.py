"""gpt-oss's MLP and attention options: --activation-func-clamp-value, --glu-linear-offset
(dense MLP, SequentialMLP and GroupedMLP experts) and --window-attn-skip-freq.

The gated unit is checked against a hand computation of gpt-oss's formula,
quick_gelu(min(gate, c)) * (clamp(up, -c, c) + 1) with quick_gelu(x) = x sigmoid(1.702 x),
written with torch.where rather than clamp so a swapped bound or a clamp on the wrong half
shows. fp32 on <= 32 features: 1e-6 is rounding room; the options change outputs by O(1).
"""

import pytest
import torch

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_activation import bias_activation
from megatron.core.transformer.activations import quick_gelu
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe import experts as experts_module
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.sliding_window import cache_window_size, layer_window_size
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import parse_and_validate
from megatron.training.config_from_args import core_transformer_config_from_args
from tests.core.transformer.moe.moe_cases import moe_config

TOL = dict(atol=1e-6, rtol=1e-6)
CLAMP = 0.5


def _gpt_oss_glu(x):
    gate, up = x.chunk(2, dim=-1)
    gate = torch.where(gate > CLAMP, torch.full_like(gate, CLAMP), gate)
    up = torch.where(up > CLAMP, torch.full_like(up, CLAMP), up)
    up = torch.where(up < -CLAMP, torch.full_like(up, -CLAMP), up)
    return gate * torch.sigmoid(1.702 * gate) * (up + 1.0)


def _dense_config(**kw):
    kwargs = dict(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=24, gated_linear_unit=True,
                  activation_func=quick_gelu, hidden_dropout=0.0, attention_dropout=0.0,
                  activation_func_clamp_value=CLAMP, glu_linear_offset=1.0)
    kwargs.update(kw)
    return TransformerConfig(**kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_clamped_glu_matches_hand_computation(fused):
    x = 2 * torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1))
    out = bias_activation(x, bias, quick_gelu, True, fused, CLAMP, 1.0)
    torch.testing.assert_close(out, _gpt_oss_glu(x + bias), **TOL)
    # Both options matter: dropping either one changes the result.
    assert (bias_activation(x, bias, quick_gelu, True, fused, None, 1.0) - out).abs().max() > 1e-1
    assert (bias_activation(x, bias, quick_gelu, True, fused, CLAMP, 0.0) - out).abs().max() > 1e-1


def test_default_gated_path_is_unchanged():
    x = torch.randn(4, 2, 24, generator=torch.Generator().manual_seed(2))
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(bias_activation(x, None, torch.nn.functional.silu, True, False),
                       torch.nn.functional.silu(gate) * up)


def test_dense_mlp_applies_the_options():
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    mlp = MLP(_dense_config(add_bias_linear=True))
    h = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(4))
    out, out_bias = mlp(h)
    fc1 = torch.nn.functional.linear(h, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    expected = torch.nn.functional.linear(_gpt_oss_glu(fc1), mlp.linear_fc2.weight)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("grouped", [False, True])
def test_experts_apply_the_options(grouped, monkeypatch):
    monkeypatch.setattr(experts_module, "grouped_mm_available", lambda x, w: True)
    config = moe_config(add_bias_linear=True, activation_func=quick_gelu, activation_func_clamp_value=CLAMP,
                        glu_linear_offset=1.0)
    loop = SequentialMLP(config, 1, range(4))
    module = loop
    if grouped:
        module = GroupedMLP(config, 1, range(4))
        module.load_state_dict(loop.state_dict())
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))
    out = module(x, torch.tensor(counts) if grouped else counts)
    rows = []
    for expert, chunk in zip(loop.local_experts, torch.split(x, counts)):
        fc1 = torch.nn.functional.linear(chunk, expert.linear_fc1.weight, expert.linear_fc1.bias)
        rows.append(torch.nn.functional.linear(_gpt_oss_glu(fc1), expert.linear_fc2.weight, expert.linear_fc2.bias))
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu), "gated MLP"),
    (dict(activation_func_clamp_value=0.0), "must be positive"),
])
def test_gated_options_refused_combinations(kw, match):
    with pytest.raises(ValueError, match=match):
        _dense_config(**kw)


def _window_config(freq, num_layers=4):
    return TransformerConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=4, window_size=(2, 0),
                             window_attn_skip_freq=freq, attention_backend="unfused", attention_dropout=0.0)


@pytest.mark.parametrize("freq, slides", [
    (None, [True] * 4), (2, [True, False, True, False]), (3, [True, True, False, True]),
    ([0, 1, 1, 0], [False, True, True, False]),
])
def test_window_attn_skip_freq_picks_layers(freq, slides):
    config = _window_config(freq)
    got = [layer_window_size(config, n) is not None for n in range(1, 5)]
    assert got == slides
    assert cache_window_size(config) == ((2, 0) if freq is None else None)


def test_full_attention_layer_sees_every_key():
    config = _window_config(2)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(8, 1, 4, 4, generator=gen) for _ in range(3))
    sliding = DotProductAttention(config, layer_number=1)
    full = DotProductAttention(config, layer_number=2)
    plain = DotProductAttention(_window_config(None), layer_number=2)
    causal = DotProductAttention(TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=4,
                                                   attention_backend="unfused", attention_dropout=0.0), layer_number=2)
    torch.testing.assert_close(full(q, k, v), causal(q, k, v), **TOL)
    torch.testing.assert_close(sliding(q, k, v), plain(q, k, v), **TOL)
    assert (full(q, k, v) - sliding(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize("freq, match", [
    (0, "positive integer"), ([1, 0, 1], "one 0 or 1 per layer"), ([1, 2, 1, 0], "one 0 or 1 per layer"),
])
def test_window_attn_skip_freq_refused_values(freq, match):
    with pytest.raises(ValueError, match=match):
        _window_config(freq)


def test_window_attn_skip_freq_needs_window_size():
    with pytest.raises(ValueError, match="--window-size"):
        TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, window_attn_skip_freq=2)


def test_flags_reach_the_config():
    args = parse_and_validate([
        "--num-layers", "4", "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "8",
        "--max-position-embeddings", "8", "--micro-batch-size", "1", "--quick-geglu",
        "--glu-linear-offset", "1.0", "--activation-func-clamp-value", "7.0",
        "--window-size", "4,0", "--window-attn-skip-freq", "([1]+[0])*2",
    ])
    config = core_transformer_config_from_args(args)
    assert config.glu_linear_offset == 1.0 and config.activation_func_clamp_value == 7.0
    assert config.activation_func is quick_gelu and config.gated_linear_unit
    assert config.window_attn_skip_freq == [1, 0, 1, 0]


@pytest.mark.parametrize("bias", [False, True])
def test_router_bias_follows_add_bias_linear(bias):
    from megatron.core.transformer.moe.router import TopKRouter

    router = TopKRouter(moe_config(add_bias_linear=bias), layer_number=1)
    assert (router.bias is not None) == bias
    tokens = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    expected = tokens @ router.weight.t()
    if bias:
        assert torch.equal(router.bias, torch.zeros(4))
        with torch.no_grad():
            router.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        expected = expected + router.bias
    torch.testing.assert_close(router.gating(tokens), expected, **TOL)
