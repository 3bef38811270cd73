"""BertModel (post-LayerNorm variant) matches Hugging Face BERT on the same weights (fp32).

Tolerance: both sides run the same fp32 math in a different order (fused QKV vs separate
projections, sdpa or an explicit softmax), so they differ by float32 rounding (~1e-6 on
logits of magnitude ~3). 1e-5 absolute and relative is above that noise; every planted
bug below moves the outputs by more than 100x that.
Padded positions are compared only where a loss can see them: the real tokens.
"""

import pytest
import torch

from megatron.core.models.bert.hf_mapping import megatron_to_hf, hf_to_megatron
from tests.core.models.bert_cases import SEQ, batch, hf_model, megatron_model

TOL = dict(atol=1e-5, rtol=1e-5)
ARCHS = ["BertForPreTraining", "BertForMaskedLM", "BertModel"]


@pytest.fixture(scope="module")
def pretraining():
    return hf_model("BertForPreTraining")


def _hf_outputs(hf, ids, types, mask):
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    return out


def _ours(model, ids, types, mask):
    with torch.no_grad():
        return model(ids, mask, tokentype_ids=types)


def _real(x, mask):
    return x[mask.bool()]


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_pretraining_logits_match_hf(pretraining, backend):
    ids, types, mask = batch()
    ours, _ = megatron_model(pretraining, attention_backend=backend)
    expected = _hf_outputs(pretraining, ids, types, mask)
    lm_logits, binary_logits = _ours(ours, ids, types, mask)
    assert lm_logits.shape == expected.prediction_logits.shape
    torch.testing.assert_close(_real(lm_logits, mask), _real(expected.prediction_logits, mask), **TOL)
    torch.testing.assert_close(binary_logits, expected.seq_relationship_logits, **TOL)


def test_masked_lm_logits_match_hf():
    hf = hf_model("BertForMaskedLM", seed=3, hidden_act="gelu_new")
    ids, types, mask = batch(seed=4)
    ours, _ = megatron_model(hf)
    lm_logits, binary_logits = _ours(ours, ids, types, mask)
    assert binary_logits is None
    torch.testing.assert_close(_real(lm_logits, mask), _real(_hf_outputs(hf, ids, types, mask).logits, mask), **TOL)


def test_bare_model_hidden_states_and_pooled_output_match_hf():
    hf = hf_model("BertModel", seed=5)
    ids, types, mask = batch(seed=6)
    ours, _ = megatron_model(hf)
    expected = _hf_outputs(hf, ids, types, mask)
    with torch.no_grad():
        pooled = ours.pooled_output(ids, mask, types)
        ours.return_embeddings = True
        hidden = ours(ids, mask, tokentype_ids=types)
    torch.testing.assert_close(pooled, expected.pooler_output, **TOL)
    torch.testing.assert_close(_real(hidden, mask), _real(expected.last_hidden_state, mask), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_identical(arch):
    hf = hf_model(arch, seed=7)
    _, shape = megatron_model(hf)
    original = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(original, shape), shape)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_loss_equals_cross_entropy_of_logits(pretraining):
    ours, _ = megatron_model(pretraining)
    ids, types, mask = batch()
    labels = batch(seed=9)[0]
    with torch.no_grad():
        logits, _ = ours(ids, mask, tokentype_ids=types)
        loss, _ = ours(ids, mask, tokentype_ids=types, lm_labels=labels)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    assert loss.shape == labels.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.view_as(labels), atol=1e-6, rtol=1e-6)


# Planted bugs: each must move the outputs far outside the tolerance.

def _max_diffs(hf, ours, ids, types, mask):
    expected = _hf_outputs(hf, ids, types, mask)
    lm_logits, binary_logits = _ours(ours, ids, types, mask)
    lm = (_real(lm_logits, mask) - _real(expected.prediction_logits, mask)).abs().max().item()
    return lm, (binary_logits - expected.seq_relationship_logits).abs().max().item()


def test_ignored_token_types_fail_parity(pretraining):
    ids, types, mask = batch()
    ours, _ = megatron_model(pretraining)
    # The model sees all-zero types while HF sees the real ones.
    expected = _hf_outputs(pretraining, ids, types, mask)
    lm_logits, _ = _ours(ours, ids, torch.zeros_like(types), mask)
    assert (_real(lm_logits, mask) - _real(expected.prediction_logits, mask)).abs().max() > 100 * TOL["atol"]


def test_pooler_on_wrong_token_fails_parity(pretraining, monkeypatch):
    ids, types, mask = batch()
    ours, _ = megatron_model(pretraining)
    forward = ours.pooler.forward
    monkeypatch.setattr(ours.pooler, "forward", lambda hidden, index=0: forward(hidden, SEQ - 1))
    _, binary = _max_diffs(pretraining, ours, ids, types, mask)
    assert binary > 100 * TOL["atol"]


def test_causal_mask_fails_parity(pretraining):
    from megatron.core.transformer.enums import AttnMaskType

    ids, types, mask = batch()
    ours, _ = megatron_model(pretraining)
    for layer in ours.encoder.layers:
        layer.self_attention.core_attention.attn_mask_type = AttnMaskType.padding_causal
    lm, binary = _max_diffs(pretraining, ours, ids, types, mask)
    assert lm > 100 * TOL["atol"] and binary > 100 * TOL["atol"]


def test_ignored_padding_mask_fails_parity(pretraining):
    ids, types, mask = batch()
    ours, _ = megatron_model(pretraining)
    expected = _hf_outputs(pretraining, ids, types, mask)
    lm_logits, _ = _ours(ours, ids, types, torch.ones_like(mask))
    assert (_real(lm_logits, mask) - _real(expected.prediction_logits, mask)).abs().max() > 100 * TOL["atol"]


def test_pre_ln_model_refuses_hf_export():
    from megatron.core.models.bert import BertModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True)
    model = BertModel(config, num_tokentypes=2, vocab_size=64, max_sequence_length=SEQ)
    _, shape = megatron_model(hf_model("BertForPreTraining"))
    with pytest.raises(ValueError, match="post_ln"):
        megatron_to_hf(model.state_dict(), shape)
