"""Mixtral, Qwen2-MoE and Qwen3-MoE: GPTModel with MoE layers matches Hugging Face logits (fp32).

Tolerance: as in test_gpt_hf_parity, both sides do the same fp32 math in another order
(fused QKV, sdpa vs eager attention, per-expert loops vs fused expert tensors), ~2e-6 on
logits of magnitude ~3; 1e-5 is above that and far below the planted mapping error
(experts shifted by one: differences > 1e-2).
"""

import pytest
import torch

from megatron.core.models.gpt.hf_mapping import hf_to_megatron, megatron_to_hf
from tests.core.models.hf_cases import HEADS, HIDDEN, INIT_STD, SEQ, VOCAB, megatron_model, tokens

TOL = dict(atol=1e-5, rtol=1e-5)


def _config(name: str):
    import transformers

    common = dict(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=SEQ, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
        initializer_range=INIT_STD, num_experts_per_tok=2,
    )
    if name == "mixtral":
        config = transformers.MixtralConfig(num_hidden_layers=2, intermediate_size=96, num_local_experts=4, **common)
    elif name.startswith("qwen2_moe"):
        # Layer 1 dense; q/k/v biases; a gated shared expert in every MoE layer.
        config = transformers.Qwen2MoeConfig(
            num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
            shared_expert_intermediate_size=40, mlp_only_layers=[1], decoder_sparse_step=1,
            norm_topk_prob=name == "qwen2_moe_norm", qkv_bias=True, **common,
        )
    else:
        # Layer 1 dense (mlp_only_layers), layers 0 and 2 MoE; norm_topk_prob picks the router.
        config = transformers.Qwen3MoeConfig(
            num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
            mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=name == "qwen3_moe_norm", head_dim=16,
            **common,
        )
    config._attn_implementation = "eager"
    return config


def _hf_model(name: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
            if param.dim() == 3:  # fused expert weights start at zero in some versions
                param.normal_(0.0, INIT_STD)
    return model


CASES = ["mixtral", "qwen2_moe", "qwen2_moe_norm", "qwen3_moe", "qwen3_moe_norm"]


@pytest.fixture(scope="module")
def hf_models():
    return {name: _hf_model(name) for name in CASES}


def _max_diff(hf, ours) -> float:
    ids = tokens()
    with torch.no_grad():
        return (hf(input_ids=ids).logits - ours(ids, None, None)).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(hf_models, name):
    hf = hf_models[name]
    ours, _, shape = megatron_model(hf)
    assert shape.num_moe_experts == 4
    ids = tokens()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, None, None)
    torch.testing.assert_close(got, expected, **TOL)


def test_grouped_gemm_matches_hf(hf_models):
    ours, _, _ = megatron_model(hf_models["mixtral"], config_overrides={"moe_grouped_gemm": True})
    assert _max_diff(hf_models["mixtral"], ours) < TOL["atol"]


def test_qwen3_moe_dense_layer_is_an_mlp(hf_models):
    ours, _, _ = megatron_model(hf_models["qwen3_moe"])
    layers = ours.decoder.layers
    assert hasattr(layers[0].mlp, "router") and hasattr(layers[2].mlp, "router")
    assert not hasattr(layers[1].mlp, "router")


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_identical(hf_models, name):
    hf = hf_models[name]
    _, arch, shape = megatron_model(hf)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, arch, shape), arch, shape)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_shifted_experts_fail_parity(hf_models):
    """A planted permutation bug: expert e gets the weights of expert e+1."""
    hf = hf_models["mixtral"]
    ours, _, _ = megatron_model(hf)
    experts = ours.decoder.layers[0].mlp.experts.local_experts
    with torch.no_grad():
        weights = [e.linear_fc1.weight.clone() for e in experts]
        for i, expert in enumerate(experts):
            expert.linear_fc1.weight.copy_(weights[(i + 1) % len(experts)])
    assert _max_diff(hf, ours) > 100 * TOL["atol"]


def test_wrong_router_normalization_fails_parity(hf_models):
    """Qwen3-MoE without norm_topk_prob needs the pre-softmax router; the other one differs."""
    ours, _, _ = megatron_model(hf_models["qwen3_moe"], config_overrides={"moe_router_pre_softmax": False})
    assert _max_diff(hf_models["qwen3_moe"], ours) > 100 * TOL["atol"]


def test_qwen2_moe_shared_expert_gate_matters(hf_models):
    """The shared expert's sigmoid gate is mapped: without it (gate weight zero, a constant
    0.5 gate) the logits differ."""
    hf = hf_models["qwen2_moe"]
    ours, _, _ = megatron_model(hf)
    shared = ours.decoder.layers[0].mlp.shared_experts
    assert tuple(shared.gate_weight.shape) == (1, HIDDEN)
    with torch.no_grad():
        shared.gate_weight.zero_()
    assert _max_diff(hf, ours) > 100 * TOL["atol"]
