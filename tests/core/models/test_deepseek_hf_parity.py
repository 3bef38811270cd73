"""DeepSeek-V3: GPTModel with multi-latent attention (and DeepSeek's MoE: sigmoid router with
expert bias, group-limited top-k, routed scaling, shared experts, a first dense layer)
matches Hugging Face DeepseekV3ForCausalLM logits in fp32, and HF -> ours -> HF is exact.

Tolerance: as in test_moe_hf_parity, the same fp32 math in another order (~1e-6 on logits
of magnitude ~1); 1e-5 is above that and far below what a planted mapping error gives
(a swapped head split or RoPE layout: > 1e-3).
"""

import pytest
import torch

from megatron.core.models.gpt.hf_mapping import gpt_kwargs_from_hf_config, hf_to_megatron, megatron_to_hf
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from tests.core.models.hf_cases import INIT_STD, SEQ, VOCAB, megatron_model, tokens

TOL = dict(atol=1e-5, rtol=1e-5)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 8.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.8}


def _config(q_lora_rank, dense_layers=1, rope=None):
    import transformers

    config = transformers.DeepseekV3Config(
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=4, v_head_dim=6, qk_nope_head_dim=8, n_group=4, topk_group=2,
        num_experts_per_tok=4, first_k_dense_replace=dense_layers, routed_scaling_factor=2.5,
        max_position_embeddings=SEQ, rms_norm_eps=1e-6, initializer_range=INIT_STD, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return config


def _hf_model(q_lora_rank, dense_layers=1, rope=None, seed=0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(q_lora_rank, dense_layers, rope), attn_implementation="eager"
    ).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, INIT_STD)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


CASES = {"q_lora": (12, 1), "q_direct": (None, 1), "dense": (12, 3), "yarn": (12, 1, YARN),
         "yarn_one_mscale": (12, 1, {**YARN, "mscale_all_dim": 0.0, "beta_fast": 32.0})}


@pytest.fixture(scope="module")
def hf_models():
    return {name: _hf_model(*args) for name, args in CASES.items()}


def _max_diff(hf, ours) -> float:
    ids = tokens()
    with torch.no_grad():
        return (hf(input_ids=ids).logits - ours(ids, None, None)).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(hf_models, name):
    hf = hf_models[name]
    ours, _, shape = megatron_model(hf)
    assert shape.multi_latent_attention and isinstance(ours.decoder.layers[0].self_attention, MLASelfAttention)
    assert not hasattr(ours.decoder.layers[0].mlp, "router")
    assert hasattr(ours.decoder.layers[2].mlp, "router") == (name != "dense")
    ids = tokens()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, None, None)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_identical(hf_models, name):
    hf = hf_models[name]
    _, arch, shape = megatron_model(hf)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, arch, shape), arch, shape)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_expert_bias_matters(hf_models):
    """e_score_correction_bias is mapped to the expert bias: zeroing ours changes the routing."""
    hf = hf_models["q_lora"]
    ours, _, _ = megatron_model(hf)
    with torch.no_grad():
        for layer in ours.decoder.layers[1:]:
            layer.mlp.router.expert_bias.mul_(-5.0)
    assert _max_diff(hf, ours) > 100 * TOL["atol"]


def test_rope_layout_matters(hf_models):
    """RoPE on adjacent pairs (HF rope_interleave=True) is needed: a model rotating halves differs."""
    hf = hf_models["q_lora"]
    ours, _, _ = megatron_model(hf)
    import megatron.core.transformer.multi_latent_attention as mla

    original = mla._rope_deinterleaved
    try:
        mla._rope_deinterleaved = lambda t, freqs, config, mscale=1.0: mla.apply_rotary_pos_emb(
            t, freqs, config, mscale=mscale)
        assert _max_diff(hf, ours) > 100 * TOL["atol"]
    finally:
        mla._rope_deinterleaved = original


@pytest.mark.parametrize("change, match", [
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
    (dict(num_experts_per_tok=2, topk_group=2), "topk_group"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "rope_type"),
    (dict(rope_parameters={**YARN, "attention_factor": 1.2}), "attention_factor"),
])
def test_unconvertible_configs_are_refused(change, match):
    config = _config(12).to_dict()
    config.update(change)
    with pytest.raises(ValueError, match=match):
        gpt_kwargs_from_hf_config(config)


def test_greedy_generation_equals_hf_generate(hf_models):
    """The static inference engine (KV cache of the expanded keys and values) generates what
    transformers generates, on the MoE model."""
    from megatron.core.inference import InferenceRequest, SamplingParams, StaticInferenceEngine

    hf = hf_models["q_lora"]
    ours, _, _ = megatron_model(hf)
    ids = tokens(1, 6, seed=7)
    expected = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    params = SamplingParams(top_k=1, num_tokens_to_generate=10)
    result = StaticInferenceEngine(ours, 2, 32).generate([InferenceRequest(ids[0].tolist(), params)])[0]
    assert result.generated_tokens == expected.tolist()


def test_yarn_matters(hf_models):
    """The YaRN model converted as plain RoPE (same weights) gives other logits."""
    hf = hf_models["yarn"]
    ours, _, _ = megatron_model(hf, config_overrides={"rope_type": "rope"})
    assert _max_diff(hf, ours) > 100 * TOL["atol"]
