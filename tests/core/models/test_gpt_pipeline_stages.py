"""GPTModel split into pipeline stages (pre/post_process, layer offset, set_input_tensor)
computes the same as the whole model. Same weights, same ops in the same order: the
results are equal to fp32 rounding; 1e-6 is a tight bound for logits of magnitude ~1."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ = 64, 8


def _config():
    return TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, apply_query_key_layer_scaling=True,
    )


def _model(**kw):
    torch.manual_seed(0)
    return GPTModel(_config(), vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope", **kw).eval()


def _stage_state(full_state, first_layer, num_layers, prefixes):
    """Keys of the full model that a stage holds, with layer indices made local."""
    out = {}
    for key, value in full_state.items():
        if key.startswith("decoder.layers."):
            index = int(key.split(".")[2])
            if first_layer <= index < first_layer + num_layers:
                out[key.replace(f"decoder.layers.{index}.", f"decoder.layers.{index - first_layer}.", 1)] = value
        elif key.startswith(prefixes):
            out[key] = value
    return out


def test_two_stages_equal_the_whole_model():
    full = _model(share_embeddings_and_output_weights=False)
    first = _model(share_embeddings_and_output_weights=False, post_process=False, num_layers_in_stage=2)
    last = _model(share_embeddings_and_output_weights=False, pre_process=False, num_layers_in_stage=2, layer_offset=2)
    state = full.state_dict()
    first.load_state_dict(_stage_state(state, 0, 2, ("embedding.",)), strict=True)
    last.load_state_dict(_stage_state(state, 2, 2, ("decoder.final_layernorm.", "output_layer.")), strict=True)
    assert [layer.layer_number for layer in last.decoder.layers] == [3, 4]

    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full(ids, None, None)
        hidden = first(ids, None, None)
        assert hidden.shape == (SEQ, 2, 32)
        last.set_input_tensor([hidden])
        got = last(None, None, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_tied_weights_are_marked_for_the_pipeline():
    first = _model(post_process=False)
    last = _model(pre_process=False)
    assert first.embedding.word_embeddings.weight.shared_embedding
    weight = last.output_layer.weight
    assert weight.shared and weight.shared_embedding and not weight.any()
    both = _model()
    assert both.output_layer.weight is None and "output_layer.weight" not in both.state_dict()
    assert both.shared_embedding_or_output_weight() is both.embedding.word_embeddings.weight


def test_stage_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="--num-layers"):
        _model(num_layers_in_stage=3, layer_offset=2)
