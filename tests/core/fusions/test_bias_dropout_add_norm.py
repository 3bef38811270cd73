"""The fused bias-dropout-add + norm region equals the two steps it replaces: the
bias-dropout-add reference followed by the norm's reference, forward (the sum and the
normed output) and backward (gradients of x, bias, residual and the norm's parameters,
with both outputs carrying gradient as in a layer). The training variant draws torch's
own dropout when the compiler is told to (``fallback_random``); a pre-norm layer takes
the region only when both fusions are on, and its output does not change.

Tolerance 1e-5 in fp32: the norm's row reductions are reordered by the compiler.
"""

import pytest
import torch

from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout_add import bias_dropout_add_reference
from megatron.core.fusions.fused_bias_dropout_add_norm import bias_dropout_add_norm
from megatron.core.fusions.fused_norms import layer_norm_reference, rms_norm_reference
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

TOL = dict(atol=1e-5, rtol=1e-5)
H = 32


def _inputs(with_bias=True, rms=False, zero_centered=False):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, H, generator=gen).requires_grad_()
    bias = torch.randn(H, generator=gen).requires_grad_() if with_bias else None
    residual = torch.randn(6, 2, H, generator=gen).requires_grad_()
    weight = (torch.randn(H, generator=gen) * 0.2 + (0.0 if zero_centered else 1.0)).requires_grad_()
    norm_bias = None if rms else (torch.randn(H, generator=gen) * 0.2).requires_grad_()
    return x, bias, residual, weight, norm_bias


def _two_steps(x, bias, residual, prob, training, weight, norm_bias, eps, zero_centered, rms):
    hidden = bias_dropout_add_reference(x, bias, residual, prob, training)
    if rms:
        return hidden, rms_norm_reference(hidden, weight, eps, zero_centered)
    return hidden, layer_norm_reference(hidden, weight, norm_bias, eps, zero_centered)


def _run(fn, inputs, prob, training, zero_centered, rms, seed=0):
    x, bias, residual, weight, norm_bias = inputs
    torch.manual_seed(seed)
    hidden, normed = fn(x, bias, residual, prob, training, weight, norm_bias, 1e-5, zero_centered, rms)
    w_hidden = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
    w_normed = torch.linspace(2, -0.5, normed.numel()).view_as(normed)
    params = [t for t in (x, bias, residual, weight, norm_bias) if t is not None]
    loss = (hidden * w_hidden).sum() + (normed * w_normed).sum()
    return [hidden.detach(), normed.detach(), *torch.autograd.grad(loss, params)]


def _assert_same(fast, reference):
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_inductor_no_dropout_region_equals_the_two_steps(compiled, rms):
    inputs = _inputs(rms=rms)
    _assert_same(_run(bias_dropout_add_norm, inputs, 0.0, False, False, rms),
                 _run(_two_steps, inputs, 0.0, False, False, rms))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_traced_variants_equal_the_two_steps(traced, with_bias, zero_centered):
    for rms in (False, True):
        inputs = _inputs(with_bias=with_bias, rms=rms, zero_centered=zero_centered)
        _assert_same(_run(bias_dropout_add_norm, inputs, 0.3, False, zero_centered, rms),
                     _run(_two_steps, inputs, 0.3, False, zero_centered, rms))


def test_traced_training_variant_draws_torch_dropout_with_fallback_random(traced):
    import torch._inductor.config as inductor_config

    # torch's config patch, not monkeypatch: undoing a monkeypatch of a torch config module
    # can delete the key (its values live outside the module's __dict__).
    with inductor_config.patch(fallback_random=True):
        inputs = _inputs()
        fast = _run(bias_dropout_add_norm, inputs, 0.5, True, False, False)
        _assert_same(fast, _run(_two_steps, inputs, 0.5, True, False, False))
        x, bias, residual = inputs[:3]
        dropped = (fast[0] == residual.detach()).float().mean()
        assert 0.3 < dropped < 0.7, f"dropout(0.5) dropped {dropped:.2f} of the elements"


def test_training_with_zero_prob_takes_no_random_numbers():
    inputs = _inputs()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    bias_dropout_add_norm(inputs[0], inputs[1], inputs[2], 0.0, True, inputs[3], inputs[4], 1e-5, False, False)
    assert torch.equal(torch.get_rng_state(), before)


def _config(num_layers, **overrides):
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    return TransformerConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, use_cpu_initialization=True, **overrides)


def _layer(**overrides):
    return TransformerLayer(_config(1, **overrides)).eval()


@pytest.mark.parametrize("overrides,fused", [
    ({}, True),
    ({"normalization": "RMSNorm"}, True),
    ({"bias_dropout_fusion": False}, False),
    ({"persist_layer_norm": False}, False),
    ({"transformer_block_type": "post_ln"}, False),
], ids=["layernorm", "rmsnorm", "no-bias-dropout-fusion", "no-persist-layer-norm", "post-ln"])
def test_layer_takes_the_region_only_with_both_fusions(overrides, fused):
    assert _layer(**overrides).fuse_add_and_mlp_norm is fused


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_layer_output_and_grads_do_not_change(traced, normalization):
    layer = _layer(normalization=normalization)
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def run():
        out = layer(x)[0]
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])]

    fused = run()
    layer.fuse_add_and_mlp_norm = False
    _assert_same(fused, run())


def _block(**overrides):
    from megatron.core.transformer.transformer_block import TransformerBlock

    return TransformerBlock(_config(3, **overrides)).eval()


@pytest.mark.parametrize("overrides", [{}, {"normalization": "RMSNorm"},
                                       {"recompute_granularity": "full", "recompute_method": "uniform",
                                        "recompute_num_layers": 2}],
                         ids=["layernorm", "rmsnorm", "recompute-chunks-of-2"])
def test_block_chains_layers_through_the_fused_region_unchanged(traced, monkeypatch, overrides):
    """Each layer's last add and the next layer's input norm as one region: the block's
    output and gradients equal the unchained ones, and the chain is taken (n - 1 links)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    block = _block(**overrides).train()
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(2), requires_grad=True)
    links = []
    original = TransformerLayer.chains_into

    def counted(self, following):
        links.append(original(self, following))
        return links[-1]

    def run():
        x.grad = None
        block.zero_grad(set_to_none=True)
        out = block(x)
        out.square().sum().backward()  # (recompute's checkpoint takes no autograd.grad)
        return [out.detach(), x.grad, *(p.grad for p in block.parameters())]

    monkeypatch.setattr(TransformerLayer, "chains_into", counted)
    chained = run()
    # recompute: chunks [0, 2) and [2, 3) chain inside the first only, once more when recomputed
    assert sum(links) == 2
    monkeypatch.setattr(TransformerLayer, "chains_into", lambda self, following: False)
    _assert_same(chained, run())


def test_fused_norms_are_called_as_modules_so_their_hooks_run():
    """The distributed optimizer waits for a module's gathered parameters in a forward
    pre-hook: the fused add+norm (inside a layer and across layers) must go through it."""
    block = _block().train()
    called = []
    for i, layer in enumerate(block.layers):
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            getattr(layer, name).register_forward_pre_hook(lambda m, args, key=(i, name): called.append(key))
    block(torch.randn(8, 2, H))
    assert sorted(called) == [(i, name) for i in range(3) for name in ("input_layernorm", "pre_mlp_layernorm")]

