"""BertModel's structure: Megatron's parameter names (pre-LN) and NeMo's (post-LN), the heads
--bert-no-binary-head removes, and the shapes forward returns."""

import pytest
import torch

from megatron.core.models.bert import BertModel
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ = 64, 8


def _model(block_type="pre_ln", **kwargs):
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0, transformer_block_type=block_type)
    kwargs.setdefault("num_tokentypes", 2)
    return BertModel(config, vocab_size=VOCAB, max_sequence_length=SEQ, **kwargs)


def test_megatron_pre_ln_parameter_names():
    names = set(_model().state_dict())
    expected = {
        "embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
        "embedding.tokentype_embeddings.weight",
        "encoder.layers.0.input_layernorm.weight", "encoder.layers.0.self_attention.linear_qkv.weight",
        "encoder.layers.0.self_attention.linear_proj.bias", "encoder.layers.0.pre_mlp_layernorm.bias",
        "encoder.layers.1.mlp.linear_fc2.weight", "encoder.final_layernorm.weight",
        "lm_head.dense.weight", "lm_head.layer_norm.bias", "output_layer.bias",
        "pooler.dense.weight", "binary_head.weight", "binary_head.bias",
    }
    assert expected <= names
    # the output layer is tied to the word embeddings: only its bias is its own
    assert "output_layer.weight" not in names
    assert not any("post_att_layernorm" in n or "initial_layernorm" in n for n in names)


def test_post_ln_parameter_names():
    names = set(_model("post_ln").state_dict())
    assert {"encoder.initial_layernorm.weight", "encoder.layers.0.post_att_layernorm.weight",
            "encoder.layers.1.post_mlp_layernorm.bias"} <= names
    assert not any("final_layernorm" in n or "input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


def test_no_binary_head_drops_pooler_and_binary_head():
    model = _model(num_tokentypes=0, add_binary_head=False)
    names = set(model.state_dict())
    assert not any(n.startswith(("pooler.", "binary_head.")) or "tokentype" in n for n in names)
    ids = torch.randint(0, VOCAB, (3, SEQ))
    lm, binary = model(ids, torch.ones(3, SEQ), lm_labels=ids)
    assert lm.shape == (3, SEQ) and binary is None


def test_forward_shapes_and_tied_output():
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (3, SEQ))
    logits, binary = model(ids, torch.ones(3, SEQ), tokentype_ids=torch.zeros_like(ids))
    assert logits.shape == (3, SEQ, VOCAB) and binary.shape == (3, 2)
    # changing the word embedding changes the output layer (tied weights)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[5].add_(1.0)
        again, _ = model(ids, torch.ones(3, SEQ), tokentype_ids=torch.zeros_like(ids))
    assert not torch.allclose(again[..., 5], logits[..., 5])


def test_padding_only_masks_keys():
    """A padded key changes nothing for real tokens, whatever its id."""
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (1, SEQ))
    mask = torch.ones(1, SEQ)
    mask[0, -2:] = 0
    other = ids.clone()
    other[0, -2:] = (ids[0, -2:] + 1) % VOCAB
    types = torch.zeros_like(ids)
    with torch.no_grad():
        a, binary_a = model(ids, mask, tokentype_ids=types)
        b, binary_b = model(other, mask, tokentype_ids=types)
    torch.testing.assert_close(a[0, :-2], b[0, :-2])
    torch.testing.assert_close(binary_a, binary_b)
    assert torch.isfinite(a).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="binary head reads the pooler"):
        _model(add_pooler=False)
    with pytest.raises(ValueError, match="learned_absolute"):
        _model(position_embedding_type="rope")
    with pytest.raises(ValueError, match="transformer_block_type"):
        _model("sandwich")
    with pytest.raises(ValueError, match=r"\[b, s\] padding mask"):
        _model()(torch.zeros(1, SEQ, dtype=torch.long), torch.ones(1, 1, SEQ, SEQ), torch.zeros(1, SEQ, dtype=torch.long))
