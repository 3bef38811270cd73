"""Sparse upcycling (megatron/core/transformer/moe/upcycling.py): an MoE model made from a
dense one computes what the dense one computes where the rule says it must (softmax after
the top-k, g = 1, any activation; squared ReLU at any granularity), the scale factors are
Megatron's, and bad shapes are refused by flag."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.activations import squared_relu
from megatron.core.transformer.moe.upcycling import (
    UpcyclingShape,
    check_shape,
    expert_tensors,
    tied_router,
    upcycle_state_dict,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.upcycling import moe_layer_experts

H, FFN, VOCAB, SEQ = 32, 64, 96, 12


def _model(ffn, experts=None, topk=2, **kw):
    torch.manual_seed(0)
    moe = dict(num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=ffn) if experts else {}
    cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=ffn,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, **moe, **kw)
    return GPTModel(cfg, vocab_size=VOCAB, max_sequence_length=SEQ).eval()


def _shape(model, granularity):
    c = model.config
    return UpcyclingShape(c.num_moe_experts, c.moe_router_topk, granularity, c.moe_router_pre_softmax,
                          c.gated_linear_unit, c.activation_func is squared_relu)


def _upcycled(dense, moe, granularity=1):
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), moe.state_dict(), _shape(moe, granularity),
                                           moe_layer_experts(moe)))
    return moe


def _logits(model):
    tokens = torch.arange(2 * SEQ).view(2, SEQ) % VOCAB
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        return model(tokens, position_ids, None)


@pytest.mark.parametrize("kw", [dict(), dict(gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                                             add_bias_linear=False)], ids=["gelu-bias", "swiglu"])
def test_copies_of_the_mlp_routed_after_softmax_give_the_dense_logits(kw):
    dense = _model(FFN, **kw)
    moe = _upcycled(dense, _model(FFN, experts=4, **kw))
    torch.testing.assert_close(_logits(moe), _logits(dense), atol=1e-5, rtol=1e-5)
    # every expert is the dense MLP; attention and norms are copied
    sd, dsd = moe.state_dict(), dense.state_dict()
    for e in range(4):
        assert torch.equal(sd[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"],
                           dsd["decoder.layers.1.mlp.linear_fc1.weight"])
    assert torch.equal(sd["decoder.layers.0.self_attention.linear_qkv.weight"],
                       dsd["decoder.layers.0.self_attention.linear_qkv.weight"])


def test_granular_experts_of_squared_relu_give_the_dense_logits():
    """g = 2: four experts of FFN/2 from two copies of the MLP, the pieces of one copy routed
    together (tied router rows); each chosen piece is weighted 1/2 and scaled by 2^(1/3) in
    FC1 and FC2, which squared ReLU turns into exactly x 2."""
    kw = dict(activation_func=squared_relu, add_bias_linear=False)
    dense = _model(FFN, **kw)
    moe = _upcycled(dense, _model(FFN // 2, experts=4, **kw), granularity=2)
    router = moe.state_dict()["decoder.layers.0.mlp.router.weight"]
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    torch.testing.assert_close(_logits(moe), _logits(dense), atol=1e-5, rtol=1e-5)


def test_gated_pieces_take_the_same_neurons_of_gate_and_up():
    shape = UpcyclingShape(4, 2, 2, False, gated=True, squared_relu=False)
    fc1 = torch.arange(8.0).view(8, 1)  # gate rows 0-3, up rows 4-7
    pieces = expert_tensors("linear_fc1.weight", fc1, shape)
    scale = 2 ** (1 / 3)
    assert torch.equal(pieces[0], torch.tensor([[0.0], [1.0], [4.0], [5.0]]) * scale)
    assert torch.equal(pieces[1], torch.tensor([[2.0], [3.0], [6.0], [7.0]]) * scale)
    fc2 = torch.arange(4.0).view(1, 4)
    assert torch.equal(expert_tensors("linear_fc2.weight", fc2, shape)[1], torch.tensor([[2.0, 3.0]]) * scale)
    assert torch.equal(expert_tensors("linear_fc2.bias", torch.ones(3), shape)[0], torch.ones(3))


def test_scale_factors_are_megatrons():
    # softmax after the top-k: the activation is g times too small
    assert UpcyclingShape(8, 2, 1, False, False, False).weight_scale() == 1.0
    assert UpcyclingShape(8, 2, 2, False, False, False).weight_scale() == pytest.approx(2 ** 0.5)
    # pre-softmax: E g / k (expansion rate E/g times g^2), cube root for gated units
    assert UpcyclingShape(8, 2, 1, True, True, False).weight_scale() == pytest.approx(4 ** (1 / 3))
    assert UpcyclingShape(8, 2, 2, True, False, False).activation_scale() == pytest.approx(8)
    assert torch.equal(tied_router(torch.arange(4.0).view(4, 1), 2), torch.tensor([[0.0], [0.0], [1.0], [1.0]]))


def test_bad_shapes_name_the_flag():
    with pytest.raises(ValueError, match="--moe-ffn-hidden-size 32"):
        check_shape(UpcyclingShape(4, 2, 2, False, False, False), 64, 64)
    with pytest.raises(ValueError, match="--num-experts 6 must be a multiple of --moe-upcycling-granularity 4"):
        check_shape(UpcyclingShape(6, 2, 4, False, False, False), 64, 16)
