"""A hybrid MambaModel (Mamba, attention, MLP layers) matches Hugging Face
``NemotronHForCausalLM`` on the same weights (fp32, torch path). Tolerance as in
test_mamba_hf_parity: same fp32 math in another order, ~1e-6 on logits; 1e-5 sits
between that and the planted mistake below."""

import pytest
import torch

from megatron.core.models.mamba import MambaModel
from megatron.core.models.mamba.hf_mapping_nemotron_h import (
    hf_to_megatron,
    megatron_to_hf,
    nemotron_h_kwargs_from_hf_config,
)
from megatron.core.ssm.mamba_config import MambaConfig
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ = 96, 19


@pytest.fixture(scope="module")
def hf():
    import transformers

    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["linear_attention", "mlp", "full_attention",
                                                             "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
        ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=8, use_mamba_kernels=False,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    config._attn_implementation = "eager"
    model = transformers.NemotronHForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "A_log" not in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _ours(hf):
    c = hf.config.to_dict()
    config_kwargs, mamba_kwargs, model_kwargs = nemotron_h_kwargs_from_hf_config(c)
    config = TransformerConfig(use_cpu_initialization=True, attention_backend="unfused", **config_kwargs)
    model = MambaModel(config, MambaConfig(**mamba_kwargs), **model_kwargs).eval()
    model.load_state_dict(hf_to_megatron(hf.state_dict(), c), strict=True)
    return model


def _logits(hf, ours):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return ours(ids, None, None), hf(input_ids=ids).logits


def test_hybrid_logits_match_nemotron_h(hf):
    assert _ours(hf).hybrid_layer_pattern == "M-*M"
    got, expected = _logits(hf, _ours(hf))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_round_trip_is_identical(hf):
    c = hf.config.to_dict()
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, c), c)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_planted_kv_group_order_fails(hf):
    ours = _ours(hf)
    qkv = ours.decoder.layers[2].self_attention.linear_qkv.weight
    with torch.no_grad():
        qkv.copy_(torch.cat([qkv[qkv.shape[0] // 2:], qkv[:qkv.shape[0] // 2]]))  # swap the two query groups
    got, expected = _logits(hf, ours)
    assert (got - expected).abs().max() > 1e-3
