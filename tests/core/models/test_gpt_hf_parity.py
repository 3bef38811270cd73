"""GPTModel matches Hugging Face causal LMs on the same weights (fp32).

Tolerance: both sides compute the same fp32 math in a different operation order
(fused QKV vs separate projections, sdpa vs eager softmax), so they differ by float32
rounding: ~2e-6 at most on logits of magnitude ~3 (init std 0.1, two layers).
1e-5 absolute and relative is above that rounding noise and below every real mistake
the broken-model tests make (tanh vs exact GeLU: ~7e-4; a wrong RoPE base, gate/up
order or window: >1e-2).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt.hf_mapping import megatron_to_hf, hf_to_megatron
from tests.core.models.hf_cases import hf_model, megatron_model, tokens

TOL = dict(atol=1e-5, rtol=1e-5)
CASES = ["gpt2", "gpt2_gelu_new", "llama", "llama31", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def hf_models():
    return {name: hf_model(name) for name in CASES}


def _logits(hf, ours, ids):
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, None, None)
    return got, expected


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(hf_models, name, backend):
    hf = hf_models[name]
    ours, _, _ = megatron_model(hf, attention_backend=backend)
    got, expected = _logits(hf, ours, tokens())
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_identical(hf_models, name):
    hf = hf_models[name]
    _, arch, shape = megatron_model(hf)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, arch, shape), arch, shape)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_loss_equals_cross_entropy_of_logits(hf_models, name):
    ours, _, _ = megatron_model(hf_models[name])
    ids, labels = tokens(seed=2), tokens(seed=3)
    with torch.no_grad():
        logits = ours(ids, None, None)
        loss = ours(ids, None, None, labels=labels)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    assert loss.shape == labels.shape and loss.dtype == torch.float32
    # the same logits through two exact fp32 log-softmax implementations
    torch.testing.assert_close(loss, expected.view_as(labels), atol=1e-6, rtol=1e-6)


def _max_diff(hf, ours):
    got, expected = _logits(hf, ours, tokens())
    return (got - expected).abs().max().item()


def test_wrong_rotary_base_fails_parity(hf_models):
    ours, _, _ = megatron_model(hf_models["llama"], model_overrides=dict(rotary_base=500000))
    assert _max_diff(hf_models["llama"], ours) > 100 * TOL["atol"]


def test_swapped_gate_and_up_fails_parity(hf_models):
    hf = hf_models["llama"]
    ours, _, _ = megatron_model(hf)
    state = ours.state_dict()
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = torch.chunk(fc1, 2, dim=0)
    state["decoder.layers.0.mlp.linear_fc1.weight"] = torch.cat((up, gate))
    ours.load_state_dict(state)
    assert _max_diff(hf, ours) > 100 * TOL["atol"]


def test_missing_sliding_window_fails_parity(hf_models):
    # seq 32 > window 8, so dropping the window must change the logits
    ours, _, _ = megatron_model(hf_models["mistral"], config_overrides=dict(window_size=None))
    assert _max_diff(hf_models["mistral"], ours) > 100 * TOL["atol"]


def test_off_by_one_window_fails_parity(hf_models):
    # HF sliding_window=8 is Megatron (7, 0); (8, 0) lets each query see one key too many
    ours, _, _ = megatron_model(hf_models["mistral"], config_overrides=dict(window_size=(8, 0)))
    assert _max_diff(hf_models["mistral"], ours) > 10 * TOL["atol"]


def test_exact_gelu_does_not_match_gelu_new(hf_models):
    # exact GeLU: unfused (the fused bias-GeLU is the tanh approximation, as in Megatron)
    ours, _, _ = megatron_model(hf_models["gpt2_gelu_new"],
                                config_overrides=dict(openai_gelu=False, bias_activation_fusion=False))
    assert _max_diff(hf_models["gpt2_gelu_new"], ours) > 10 * TOL["atol"]


def test_missing_llama31_rope_scaling_fails_parity(hf_models):
    """Llama 3.1's frequency scaling changes the logits: dropping it must fail the check."""
    hf = hf_models["llama31"]
    ours, _, _ = megatron_model(hf, model_overrides={"rope_scaling": False})
    got, expected = _logits(hf, ours, tokens())
    assert not torch.allclose(got, expected, **TOL)
