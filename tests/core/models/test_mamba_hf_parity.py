"""MambaModel (pattern of Mamba layers) matches Hugging Face ``Mamba2ForCausalLM`` on the
same weights (fp32, the transformers torch path, no CUDA kernels).

Tolerance: the same fp32 math in a different order (our chunked scan vs HF's, different
chunk sizes); logits of magnitude ~1 differ by ~1e-6. 1e-5 is above that noise and far
below the planted mistakes below (each moves logits by >1e-3).
"""

import pytest
import torch

from megatron.core.models.mamba import MambaModel
from megatron.core.models.mamba.hf_mapping import hf_to_megatron, mamba_kwargs_from_hf_config, megatron_to_hf
from megatron.core.ssm import mamba_mixer
from megatron.core.ssm.causal_conv1d import causal_conv1d
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.transformer.transformer_config import TransformerConfig

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB, LAYERS, SEQ = 96, 2, 21  # SEQ not a multiple of either side's chunk size


def _hf(tied: bool, n_groups: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=LAYERS, num_heads=8, head_dim=8,
        n_groups=n_groups, expand=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=tied, layer_norm_epsilon=1e-5,
    )
    model = transformers.Mamba2ForCausalLM(config).float().eval()
    with torch.no_grad():
        # HF initializes norms to 1 and D to 1: perturb so a mis-mapped 1-D tensor shows.
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _ours(hf, chunk_size: int = 5):
    config_kwargs, mamba_kwargs, model_kwargs = mamba_kwargs_from_hf_config(hf.config.to_dict())
    mamba_kwargs["chunk_size"] = chunk_size
    config = TransformerConfig(use_cpu_initialization=True, **config_kwargs)
    model = MambaModel(config, MambaConfig(**mamba_kwargs), **model_kwargs).eval()
    tied = model_kwargs["share_embeddings_and_output_weights"]
    model.load_state_dict(hf_to_megatron(hf.state_dict(), LAYERS, tied), strict=True)
    return model


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _compare(hf, ours):
    ids = _ids()
    with torch.no_grad():
        return ours(ids, None, None), hf(input_ids=ids).logits


@pytest.fixture(scope="module")
def hf_untied():
    return _hf(tied=False)


@pytest.mark.parametrize("tied,n_groups", [(False, 2), (True, 1), (False, 4)])
def test_logits_match_hf(tied, n_groups):
    hf = _hf(tied, n_groups)
    got, expected = _compare(hf, _ours(hf))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_identical(tied):
    hf = _hf(tied)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, LAYERS, tied), LAYERS, tied)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def _assert_differs(hf, ours):
    got, expected = _compare(hf, ours)
    assert (got - expected).abs().max() > 1e-3


def test_planted_conv_not_causal_fails(hf_untied, monkeypatch):
    def leaky(x_bld, weight, bias=None, activation=None):
        # Centered padding: each output also sees future positions.
        k = weight.shape[1]
        x = torch.nn.functional.pad(x_bld.transpose(1, 2), (k // 2, k - 1 - k // 2))
        out = torch.nn.functional.conv1d(x, weight[:, None], bias, groups=weight.shape[0])
        return torch.nn.functional.silu(out).transpose(1, 2)

    monkeypatch.setattr(mamba_mixer, "causal_conv1d", leaky)
    _assert_differs(hf_untied, _ours(hf_untied))


def test_planted_dt_bias_dropped_fails(hf_untied):
    ours = _ours(hf_untied)
    with torch.no_grad():
        for layer in ours.decoder.layers:
            layer.mixer.dt_bias.zero_()
    _assert_differs(hf_untied, ours)


def test_planted_group_mapping_off_fails(hf_untied, monkeypatch):
    original = mamba_mixer.ssd_scan

    def interleaved(x, dt, A, B, C, chunk_size, D):
        # Head i reads group i % g instead of i // (h / g): scan the heads in an order
        # that makes the contiguous mapping interleaved, then put them back.
        h, g = x.shape[2], B.shape[2]
        perm = torch.arange(h).reshape(h // g, g).t().reshape(-1)
        y = original(x[:, :, perm], dt[:, :, perm], A[perm], B, C, chunk_size, D[perm])
        return y[:, :, torch.argsort(perm)]

    monkeypatch.setattr(mamba_mixer, "ssd_scan", interleaved)
    _assert_differs(hf_untied, _ours(hf_untied))


def test_chunk_size_does_not_change_logits(hf_untied):
    a, _ = _compare(hf_untied, _ours(hf_untied, chunk_size=3))
    b, _ = _compare(hf_untied, _ours(hf_untied, chunk_size=64))
    torch.testing.assert_close(a, b, **TOL)


def test_causal_conv_entry_is_the_one_used():
    # Guards the monkeypatch above: the mixer must call the module-level name.
    assert mamba_mixer.causal_conv1d is causal_conv1d
