"""gpt-oss: GPTModel matches Hugging Face GptOssForCausalLM logits (fp32), and HF -> ours ->
HF returns the same tensors.

The tiny config keeps everything gpt-oss has: attention sinks, q/k/v/o biases, alternating
sliding (window 4, shorter than the 32 tokens) and full layers, a biased top-k router, and
experts with biases, a clamp the activations reach (limit 0.5) and the +1 linear offset.
Tolerance as in test_moe_hf_parity: same fp32 math in another order, ~2e-6 on logits of
order 1; 1e-5 is far below what each planted bug below changes (> 1e-3).
"""

import pytest
import torch

from megatron.core.models.gpt.hf_mapping import hf_to_megatron, megatron_to_hf
from tests.core.models.hf_cases import HEADS, HIDDEN, INIT_STD, SEQ, VOCAB, megatron_model, tokens

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hf():
    import transformers

    config = transformers.GptOssConfig(
        num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=SEQ, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, swiglu_limit=0.5,
        initializer_range=INIT_STD, attention_dropout=0.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, INIT_STD)
    return model


def _max_diff(hf, ours) -> float:
    ids = tokens()
    with torch.no_grad():
        return (hf(input_ids=ids).logits - ours(ids, None, None)).abs().max().item()


def test_logits_match_hf(hf):
    ours, arch, _ = megatron_model(hf)
    assert arch == "gpt_oss"
    assert ours.config.window_attn_skip_freq == [1, 0] and ours.config.window_size == (3, 0)
    assert _max_diff(hf, ours) < TOL["atol"]


def test_grouped_gemm_matches_hf(hf):
    ours, _, _ = megatron_model(hf, config_overrides={"moe_grouped_gemm": True})
    assert _max_diff(hf, ours) < TOL["atol"]


def test_round_trip_is_identical(hf):
    _, arch, shape = megatron_model(hf)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, arch, shape), arch, shape)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("overrides", [
    {"activation_func_clamp_value": None}, {"glu_linear_offset": 0.0}, {"window_attn_skip_freq": None},
    {"window_attn_skip_freq": [0, 1]},
])
def test_each_option_matters(hf, overrides):
    ours, _, _ = megatron_model(hf, config_overrides=overrides)
    assert _max_diff(hf, ours) > 100 * TOL["atol"]


def test_router_bias_and_deinterleave_matter(hf):
    ours, _, _ = megatron_model(hf)
    router = ours.decoder.layers[0].mlp.router
    with torch.no_grad():
        router.bias.zero_()
    assert _max_diff(hf, ours) > 100 * TOL["atol"]
    ours, _, _ = megatron_model(hf)
    fc1 = ours.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1
    with torch.no_grad():
        gate, up = fc1.weight.chunk(2)
        fc1.weight.copy_(torch.stack((gate, up), dim=1).reshape_as(fc1.weight))  # re-interleaved rows
    assert _max_diff(hf, ours) > 100 * TOL["atol"]
